"""Peak memory and time of quantizing a Llama-2-7B-shaped model the way ``inlaid quantize`` does (issue 4).

Builds a copy of the bundled ``llama2-7b-shapes`` config with ``--layers`` decoder
layers (``dummy`` random weights, like vLLM's ``load_format="dummy"``), random
rank-``--rank`` PEFT adapters for ``--tasks`` tasks and token-id calibration JSONL,
then runs ``inlaid.quant.quantize_model.quantize_model`` (load, calibrate every
task with its adapter layer by layer, GPTQ layer by layer, write the checkpoint
and Hessian store). Reports wall time per phase, time per layer, and the peak
``torch.cuda.max_memory_allocated`` (process peak RSS on CPU).

Peak memory is the resident fp16 weights plus ONE layer's working set
(calibration activations, that layer's Hessians, GPTQ on the largest matrix), so
with fewer layers the full-model peak is ``peak + (32 - layers) x one layer's
fp16 weights``; the report prints that extrapolation next to the measurement.

    PYTHONPATH=. python benchmarks/quant_memory.py --device cuda --layers 4 --out OUT/quant_memory.json
    PYTHONPATH=. python benchmarks/quant_memory.py --device cpu --quick   # tiny shapes, end-to-end check
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
logger = logging.getLogger("quant_memory")


def make_inputs(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, str], dict[str, str], dict]:
    """(model dir with ``--layers`` layers, adapters, calibration files, the full model's config)."""
    from inlaid.lora.synthetic import random_adapter, save_peft
    from inlaid.model.arch import ModelArch
    from inlaid.model.loader import resolve_model_path

    full = json.loads((resolve_model_path(args.model) / "config.json").read_text())
    cfg = dict(full, num_hidden_layers=args.layers)
    if args.quick:
        cfg.update(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4,
                   vocab_size=1000)  # fmt: skip
        full = dict(full, **{k: cfg[k] for k in ("hidden_size", "intermediate_size", "vocab_size")})
    mdir = work / "model"
    mdir.mkdir(parents=True)
    (mdir / "config.json").write_text(json.dumps(cfg, indent=1))
    arch = ModelArch.from_dir(mdir)
    rng = random.Random(0)
    ads, calib = {}, {}
    for k in range(args.tasks):
        name = f"task{k}"
        adapter = random_adapter(name, arch.lora_module_shapes(), arch.num_layers, args.rank, seed=k)
        ads[name] = str(save_peft(adapter, work / "adapters" / name))
        rows = [{"input_ids": [rng.randrange(cfg["vocab_size"]) for _ in range(args.seq_len)]}
                for _ in range(args.samples)]  # fmt: skip
        calib[name] = str(work / f"{name}.jsonl")
        Path(calib[name]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return mdir, ads, calib, full


def layer_weight_bytes(cfg: dict[str, Any], bytes_per: int = 2) -> int:
    """fp16 bytes of one decoder layer's linears (q/k/v/o + gate/up/down), as the model holds them."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) // cfg["num_attention_heads"]
    return bytes_per * (2 * h * h + 2 * h * kv + 3 * h * i)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from inlaid.quant.quantize_model import quantize_model

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    mdir, ads, calib, full = make_inputs(args, work)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    t0 = time.perf_counter()
    rep = quantize_model(str(mdir), ads, calib, args.method, args.bits, args.group_size, work / "out",
                         max_samples=args.samples, max_seq_len=args.seq_len, device=args.device, dtype=dtype,
                         load_format="dummy")  # fmt: skip
    wall = time.perf_counter() - t0
    per_layer = layer_weight_bytes(full, 2 if dtype == torch.float16 else 4)
    n_full = full["num_hidden_layers"]
    return {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "shapes": "tiny (--quick)" if args.quick else args.model, "layers": args.layers, "full_layers": n_full,
        "tasks": args.tasks, "samples_per_task": args.samples, "seq_len": args.seq_len, "rank": args.rank,
        "method": args.method, "bits": args.bits, "group_size": args.group_size, "dtype": str(dtype),
        "seconds_total": wall, "seconds_calibrate": rep.seconds_calibrate, "seconds_quantize": rep.seconds_quantize,
        "seconds_per_layer": (rep.seconds_calibrate + rep.seconds_quantize) / args.layers,
        "peak_bytes": rep.peak_memory_bytes, "peak_kind": rep.peak_memory_kind,
        "layer_weight_bytes": per_layer,
        "extrapolated_full_peak_bytes": rep.peak_memory_bytes + (n_full - args.layers) * per_layer,
    }  # fmt: skip


def to_markdown(res: dict[str, Any]) -> str:
    gib = 2**30
    return "\n".join([
        f"Quantizing {res['shapes']} ({res['layers']} of {res['full_layers']} layers, dummy weights, "
        f"{res['dtype']}) with {res['method']} {res['bits']}-bit g{res['group_size']}, {res['tasks']} tasks x "
        f"{res['samples_per_task']} samples x {res['seq_len']} tokens, rank-{res['rank']} adapters, on "
        f"{res['device']}:", "",
        "| measure | value |", "|---|---|",
        f"| wall time (load + calibrate + quantize + write) | {res['seconds_total']:.1f} s |",
        f"| calibrate / quantize | {res['seconds_calibrate']:.1f} s / {res['seconds_quantize']:.1f} s |",
        f"| per layer (calibrate + quantize) | {res['seconds_per_layer']:.2f} s |",
        f"| peak memory ({res['peak_kind']}) | {res['peak_bytes'] / gib:.2f} GiB |",
        f"| one layer's weights | {res['layer_weight_bytes'] / gib:.2f} GiB |",
        f"| full-model peak (measured + remaining layers' weights) | "
        f"{res['extrapolated_full_peak_bytes'] / gib:.2f} GiB |", "",
    ])  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama2-7b-shapes")
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--method", default="mlgptq-diag")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="tiny hidden sizes (CPU end-to-end check)")
    p.add_argument("--work", default="/tmp/inlaid_quant_memory")
    p.add_argument("--out", default=None, help="results JSON (a .md beside it)")
    args = p.parse_args()
    if args.quick:
        args.samples, args.seq_len = min(args.samples, 4), min(args.seq_len, 64)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    res = run(args)
    md = to_markdown(res)
    logger.info("\n%s", md)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
        Path(args.out).with_suffix(".md").write_text(md)


if __name__ == "__main__":
    main()
