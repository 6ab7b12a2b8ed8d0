"""``inlaid quantize``: MLGPTQ (or a baseline) over a base model and its task adapters.

    inlaid quantize --model default --adapter de=adapters/de --calib de=de.jsonl \\
        --adapter fr=adapters/fr --calib fr=fr.jsonl --method mlgptq --bits 4 --group-size 64 --out q4

Writes a standard GPTQ checkpoint into ``--out`` with the per-task Hessian
store in ``--out/hessians/`` and ``--out/quantize_report.json`` (time, peak
memory: RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA).
"""

from __future__ import annotations

import argparse
import json
import sys

# kept here so the CLI parser builds without importing torch; a test checks it equals quantize_model.METHODS
_METHODS = ("mlgptq", "mlgptq-psd", "mlgptq-diag", "mlgptq-norm", "mlgptq-normdiag", "mlgptq-rowmax",
            "gptq-mixed", "gptq-single", "rtn")


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("quantize", help="quantize the shared base for all tasks (MLGPTQ, GPTQ-mixed/single, RTN)")
    p.add_argument("--model", default="default", help="fp base: HF dir, .gguf, 'default' or a bundled shape name")
    p.add_argument("--adapter", action="append", metavar="NAME=PATH", help="task adapter, PEFT dir (repeatable)")
    p.add_argument("--calib", action="append", metavar="NAME=FILE",
                   help="task calibration JSONL: prompt/completion, text or input_ids rows (repeatable)")
    p.add_argument("--method", choices=_METHODS, default="gptq-mixed",
                   help="Hessian of the shared base: gptq-mixed (default; the sample-weighted mean over tasks, the "
                        "best shareable method measured, benchmarks/results/quality.md), mlgptq (the paper's "
                        "element-wise max: not positive definite, measured worst), mlgptq-diag (mean + the max's "
                        "diagonal excess), mlgptq-psd, mlgptq-norm / mlgptq-normdiag / mlgptq-rowmax (per-task "
                        "scale-normalized aggregates, docs/quantize.md), gptq-single (--task), rtn")
    p.add_argument("--task", default=None, help="gptq-single: the task whose Hessian is used")
    p.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8")
    p.add_argument("--group-size", type=int, default=128, help="-1 (per channel), 32, 64 or 128")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True, help="symmetric grid")
    p.add_argument("--act-order", action="store_true", help="GPTQ desc_act column order")
    p.add_argument("--percdamp", type=float, default=0.01, help="GPTQ damping (fraction of mean diag H)")
    p.add_argument("--max-samples", type=int, default=128, help="calibration samples per task")
    p.add_argument("--max-tokens", type=int, default=65536, help="calibration tokens per task")
    p.add_argument("--max-seq-len", type=int, default=512, help="tokens per calibration sample")
    p.add_argument("--load-format", choices=("auto", "dummy"), default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--out", required=True, help="output directory of the GPTQ checkpoint")
    p.set_defaults(func=run)


def _pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    from inlaid.cli import parse_adapters

    try:
        return parse_adapters(items)
    except ValueError as e:
        raise ValueError(str(e).replace("--adapter", flag)) from None


def run(args: argparse.Namespace) -> int:
    from inlaid.engine.setup import resolve_device, resolve_dtype
    from inlaid.quant.quantize_model import quantize_model

    device = resolve_device(args.device)
    report = quantize_model(
        args.model, _pairs(args.adapter, "--adapter"), _pairs(args.calib, "--calib"), args.method, args.bits,
        args.group_size, args.out, sym=args.sym, act_order=args.act_order, task=args.task, percdamp=args.percdamp,
        max_samples=args.max_samples, max_tokens=args.max_tokens, max_seq_len=args.max_seq_len, device=device,
        dtype=resolve_dtype(args.dtype, device), load_format=args.load_format,
    )  # fmt: skip
    sys.stdout.write(json.dumps({"out": report.out_dir, "seconds": round(report.seconds_total, 2),
                                 "peak_memory_mb": round(report.peak_memory_bytes / 2**20, 1)}) + "\n")  # fmt: skip
    return 0
