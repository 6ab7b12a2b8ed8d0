"""Decode throughput baseline (issue 2): inlaid vs transformers(+PEFT) generate.

For each model shape (dummy weights) and batch size B in {1, 8, 32} with 0 or 8
distinct rank-16 adapters on all 7 projections, both systems generate
``--new-tokens`` tokens (EOS ignored) after a ``--prompt-len`` prompt.
Decode tokens/s = B * (new_tokens - 1) / (T_full - T_first), where T_first is the
time to the first token (prefill), so prefill cost is excluded for both.

Writes JSON to ``--out`` and prints a Markdown table. Needs CUDA for the
numbers that matter; runs on CPU with ``--device cpu --quick`` as a smoke test.

    python benchmarks/decode_baseline.py --out benchmarks/results/decode_baseline.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from inlaid.bench.engine_driver import build_bench_engine
from inlaid.config import SchedulerConfig
from inlaid.engine.gc_heap import frozen_heap
from inlaid.engine.llm_engine import LLMEngine
from inlaid.sampling import SamplingParams

HERE = Path(__file__).resolve().parent
MODELS = {"smollm2-135m": str(HERE / "configs" / "smollm2-135m"), "llama2-7b": "llama2-7b-shapes"}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_engine(model: str, device: str, num_blocks: int, n_adapters: int, max_num_seqs: int = 64,
                 dtype: str | None = None) -> LLMEngine:
    """A dummy-weight engine with ``n_adapters`` random rank-16 adapters ``a0..`` on all 7 projections (``dtype``
    None: ``build_bench_engine``'s default)."""
    sched = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=8192)
    return build_bench_engine(model, device, max(n_adapters, 1), n_adapters, 16, num_blocks, sched, name_prefix="a",
                              dtype=dtype)


def run_inlaid(eng: LLMEngine, prompts: list[list[int]], adapters: list[str | None], new_tokens: int,
               device: str) -> tuple[float, float]:
    """Returns (time to first token of the batch, total time). The heap is frozen while it runs, as ``inlaid
    serve`` runs (``inlaid.engine.gc_heap``): no full garbage collection lands in the timed steps."""
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    with frozen_heap():
        sync(device)
        t0 = time.perf_counter()
        for i, (p, a) in enumerate(zip(prompts, adapters)):
            eng.add_request(f"b{i}-{t0}", p, params, a)
        t_first = None
        while eng.has_unfinished_requests():
            outs = eng.step()
            if t_first is None and outs and all(o.token_ids for o in outs):
                sync(device)
                t_first = time.perf_counter() - t0
        sync(device)
        return t_first or 0.0, time.perf_counter() - t0


def hf_model(model_dir: str, device: str, n_adapters: int):  # noqa: ANN201
    from transformers import AutoConfig, AutoModelForCausalLM

    from inlaid.model.loader import resolve_model_path

    config = AutoConfig.from_pretrained(str(resolve_model_path(model_dir)))
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    if n_adapters == 0:
        return model
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lcfg = LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(model, lcfg, adapter_name="a0")
    for i in range(1, n_adapters):
        model.add_adapter(f"a{i}", lcfg)
    return model.to(device).eval()


def run_hf(model, prompts: list[list[int]], adapters: list[str | None], new_tokens: int, device: str) -> tuple[float, float]:  # noqa: ANN001
    ids = torch.tensor(prompts, device=device)
    kw = {"adapter_names": [a or "__base__" for a in adapters]} if any(adapters) else {}

    def gen(n: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
        sync(device)
        return time.perf_counter() - t0

    return gen(1), gen(new_tokens)


def decode_tps(batch: int, new_tokens: int, t_first: float, t_total: float) -> float:
    return batch * (new_tokens - 1) / max(t_total - t_first, 1e-9)


def bench_model(name: str, args: argparse.Namespace) -> list[dict]:
    rows = []
    vocab = 32000
    gen = torch.Generator().manual_seed(0)
    for n_ad in (0, 8):
        eng = build_engine(MODELS[name], args.device, args.num_blocks, n_ad)
        hf = hf_model(MODELS[name], args.device, n_ad) if not args.skip_hf else None
        for batch in args.batches:
            prompts = torch.randint(3, vocab, (batch, args.prompt_len), generator=gen).tolist()
            adapters = [f"a{i % n_ad}" if n_ad else None for i in range(batch)]
            run_inlaid(eng, prompts, adapters, 4, args.device)  # warm-up
            tf, tt = run_inlaid(eng, prompts, adapters, args.new_tokens, args.device)
            row = {"model": name, "batch": batch, "adapters": n_ad, "inlaid_decode_tps": decode_tps(batch, args.new_tokens, tf, tt),
                   "inlaid_ttft_s": tf}
            if hf is not None:
                run_hf(hf, prompts, adapters, 4, args.device)  # warm-up
                hf_first, hf_total = run_hf(hf, prompts, adapters, args.new_tokens, args.device)
                row["hf_decode_tps"] = decode_tps(batch, args.new_tokens, hf_first, hf_total)
                row["ratio"] = row["inlaid_decode_tps"] / row["hf_decode_tps"]
            print(json.dumps(row), flush=True)
            rows.append(row)
        del eng, hf
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | batch | adapters | inlaid decode tok/s | transformers(+PEFT) tok/s | ratio |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        hf = f"{r['hf_decode_tps']:.0f}" if "hf_decode_tps" in r else "—"
        ratio = f"{r['ratio']:.2f}×" if "ratio" in r else "—"
        lines.append(f"| {r['model']} | {r['batch']} | {r['adapters']} | {r['inlaid_decode_tps']:.0f} | {hf} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--num-blocks", type=int, default=1024)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = [r for m in args.models for r in bench_model(m, args)]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    md = f"Device: {device}; prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, bf16, dummy weights.\n\n" + table(rows)
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": device, "args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1, default=str))
        args.out.with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
