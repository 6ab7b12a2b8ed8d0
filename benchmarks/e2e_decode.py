"""End-to-end decode throughput (issue 8): inlaid eager vs CUDA graphs, fp16-class vs W4 g128, vs the roofline.

Dummy-weight models through the real engine (``LLMEngine``: scheduler, ModelRunner, sampler):

- Llama-2-7B shapes, bf16 and W4 g128 (random GPTQ tensors installed in memory with ``replace_linears``: no
  checkpoint, no quantization time), batch 1 and 32, 0 and 32 rank-16 adapters on all 7 projections, eager
  (``runner.graphs = None``) and CUDA graphs;
- the bundled SmolLM2-135M shapes at batch 1 / 32 / 128 (graphs; eager at batch 1);
- transformers + PEFT ``generate`` (mixed-batch ``adapter_names``) vs inlaid on SmolLM2 shapes with 8 / 32 / 100
  adapters, one adapter per sequence (batch = adapters).

Decode tok/s = B * (new - 1) / (T_total - T_first) (prefill excluded; ``decode_baseline.run_inlaid``). Roofline:
bytes per decode step = every weight read once (linears, lm_head, norms) + distinct adapters' LoRA weights +
the KV cache read at the mean context, at ``--peak-tbps`` (3.0 TB/s for an H100); fraction = measured /
roofline tok/s. ``--w4-b1-only`` keeps just the W4 7B batch-1 rows (short device runs); ``--w4-only`` skips
the bf16 7B model. ``--overlap ab`` measures every row with overlapped engine steps off, then on (same engine,
``LLMEngine.overlap``; graphed rows only), so the two columns are a same-run A/B; the default, ``auto``, is the
engine's default. ``--dtype-7b float16`` runs the Llama-2-7B-shaped engine with fp16 activations (default bf16,
the engine's ``auto`` on CUDA). A ``--budget-s`` deadline skips the remaining rows (listed as skipped) so the run stays short.

    python benchmarks/e2e_decode.py --out benchmarks/results/e2e_decode
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_baseline import MODELS, decode_tps, hf_model, run_hf, run_inlaid  # noqa: E402
from decode_baseline import build_engine as baseline_engine  # noqa: E402

from inlaid.bench.hardware import peak_bandwidth_tbps  # noqa: E402
from inlaid.bench.pages import write_results
from inlaid.engine.llm_engine import LLMEngine  # noqa: E402
from inlaid.model.layers import ParallelLinear  # noqa: E402
from inlaid.quant.linear import GPTQLinearMethod, replace_linears  # noqa: E402


def build_engine(model: str, device: str, num_blocks: int, n_adapters: int, dtype: str | None = None) -> LLMEngine:
    """decode_baseline's engine with up to 128 sequences a step (the batch 100/128 rows); ``dtype`` None: bf16."""
    return baseline_engine(model, device, num_blocks, n_adapters, max_num_seqs=128, dtype=dtype)


@torch.no_grad()
def make_w4(model: torch.nn.Module, device: str, dtype: torch.dtype, group_size: int = 128) -> None:
    """Replace every decoder projection by a 4-bit GPTQ linear with random codes/zeros and small scales."""
    replace_linears(model, GPTQLinearMethod(4, group_size), torch.device(device), dtype)
    hi = 2**31 - 1
    for mod in model.modules():
        if isinstance(mod, ParallelLinear) and isinstance(mod.quant_method, GPTQLinearMethod):
            mod.qweight.random_(-hi - 1, hi)
            mod.qzeros.random_(-hi - 1, hi)
            mod.scales.uniform_(0.0005, 0.003)
            mod.quant_method.finalize(mod, dtype)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes read per step for the weights (embedding: only B rows, counted as 0; lm_head / tied: all)."""
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None or "rotary" in name or name.endswith(("g_idx", "dq_weight")) or ".w4_" in name:
            continue
        if name.endswith("embed_tokens.weight") and getattr(model, "lm_head", None) is not None:
            continue
        total += t.numel() * t.element_size()
    return total


def kv_bytes(arch, batch: int, ctx: float, elem: int = 2) -> float:  # noqa: ANN001
    return 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * elem * batch * ctx


def lora_bytes(arch, adapters: int, rank: int = 16, elem: int = 2) -> int:  # noqa: ANN001
    return adapters * arch.num_layers * rank * elem * sum(i + o for i, o in arch.lora_module_shapes().values())


def measure(eng, arch, wbytes: int, batch: int, n_ad: int, graphs: bool, args, label: dict,  # noqa: ANN001
            overlap: bool | None = None) -> dict:
    runner = eng.parts.runner
    saved, saved_overlap = runner.graphs, eng.overlap
    runner.graphs = saved if graphs else None
    eng.overlap = saved_overlap if overlap is None else overlap
    try:
        gen = torch.Generator().manual_seed(batch)
        prompts = torch.randint(3, arch.vocab_size, (batch, args.prompt_len), generator=gen).tolist()
        adapters = [f"a{i % n_ad}" if n_ad else None for i in range(batch)]
        run_inlaid(eng, prompts, adapters, 4, args.device)  # warm-up: compiles kernels, captures graphs
        tf, tt = run_inlaid(eng, prompts, adapters, args.new_tokens, args.device)
        used_overlap = eng.overlap
    finally:
        runner.graphs, eng.overlap = saved, saved_overlap
    tps = decode_tps(batch, args.new_tokens, tf, tt)
    step_bytes = wbytes + lora_bytes(arch, min(n_ad, batch)) + kv_bytes(arch, batch, args.prompt_len + args.new_tokens / 2)
    roof = batch / (step_bytes / (args.peak_tbps * 1e12))
    row = {**label, "batch": batch, "adapters": n_ad, "graphs": graphs, "overlap": used_overlap, "decode_tps": tps, "total_s": tt,
           "step_ms": 1e3 * batch / tps, "bytes_per_step_MB": step_bytes / 1e6, "roofline_tps": roof,
           "frac_roofline": tps / roof}
    print(json.dumps(row), flush=True)
    return row


def weights_label(quant: str, dtype: str) -> str:
    """The table's weights column: "w4g128" / "bf16" with bf16 activations, "w4g128-fp16" / "fp16" with fp16."""
    if dtype == "bfloat16":
        return quant
    return "fp16" if quant == "bf16" else f"{quant}-fp16"


def overlaps(args) -> tuple[bool | None, ...]:  # noqa: ANN001
    """The overlap settings each row is measured with (None: the engine's default)."""
    return {"ab": (False, True), "on": (True,), "off": (False,)}.get(args.overlap, (None,))


def bench_7b(args, rows: list, skipped: list, deadline: float) -> None:  # noqa: ANN001
    for quant in ("w4g128",) if args.w4_b1_only or args.w4_only else ("w4g128", "bf16"):
        if time.monotonic() > deadline:
            skipped.append(f"llama2-7b {quant}")
            continue
        eng = build_engine(MODELS["llama2-7b"], args.device, args.num_blocks, 32, args.dtype_7b)
        arch = eng.parts.arch
        if quant == "w4g128":
            make_w4(eng.parts.model, args.device, eng.parts.dtype)
        wb = weight_bytes(eng.parts.model)
        plan = [(1, 0, False), (1, 0, True), (32, 0, True), (32, 0, False), (1, 32, True), (32, 32, True),
                (32, 32, False)]
        plan = [(1, 0, True), (1, 0, False)] if args.w4_b1_only else plan
        if args.rows:  # "batch:adapters,...": graphed rows only (same-call A/B runs of one row)
            plan = [(int(b), int(a), True) for b, a in (r.split(":") for r in args.rows.split(","))]
        for batch, n_ad, graphs in plan:  # adapter-free rows first: a loaded slot makes LoRA active
            if time.monotonic() > deadline:
                skipped.append(f"llama2-7b {quant} b{batch} a{n_ad} graphs={graphs}")
                continue
            for ov in overlaps(args) if graphs else (None,):  # the A/B is for graphed steps
                rows.append(safe(measure, eng, arch, wb, batch, n_ad, graphs, args,
                                 {"model": "llama2-7b", "weights": weights_label(quant, args.dtype_7b)}, ov))
        del eng
        torch.cuda.empty_cache()


def bench_small(args, rows: list, skipped: list, deadline: float) -> None:  # noqa: ANN001
    eng = build_engine(MODELS["smollm2-135m"], args.device, args.num_blocks, 100)
    arch = eng.parts.arch
    wb = weight_bytes(eng.parts.model)
    label = {"model": "smollm2-135m", "weights": "bf16"}
    for batch, n_ad, graphs in ((1, 0, False), (1, 0, True), (32, 0, True), (128, 0, True)):
        if time.monotonic() > deadline:
            skipped.append(f"smollm2 b{batch} a{n_ad} graphs={graphs}")
            continue
        for ov in overlaps(args) if graphs else (None,):
            rows.append(safe(measure, eng, arch, wb, batch, n_ad, graphs, args, label, ov))
    for n_ad in (8, 32, 100):
        if time.monotonic() > deadline:
            skipped.append(f"smollm2 vs peft a{n_ad}")
            continue
        row = safe(measure, eng, arch, wb, n_ad, n_ad, True, args, label)
        rows.append(row)
        if row and not args.skip_hf:
            hf = safe(hf_model, MODELS["smollm2-135m"], args.device, n_ad)
            if hf is not None:
                gen = torch.Generator().manual_seed(n_ad)
                prompts = torch.randint(3, arch.vocab_size, (n_ad, args.prompt_len), generator=gen).tolist()
                names = [f"a{i}" for i in range(n_ad)]
                run_hf(hf, prompts, names, 2, args.device)
                f, t = run_hf(hf, prompts, names, args.hf_new_tokens, args.device)
                row["hf_peft_decode_tps"] = decode_tps(n_ad, args.hf_new_tokens, f, t)
                row["ratio_vs_hf_peft"] = row["decode_tps"] / row["hf_peft_decode_tps"]
                print(json.dumps(row), flush=True)
                del hf
                torch.cuda.empty_cache()


def safe(fn, *a):  # noqa: ANN001, ANN201
    try:
        return fn(*a)
    except Exception as e:  # noqa: BLE001 - one failing row must not stop the run
        print(f"ERROR {fn.__name__}{a[3:6] if len(a) > 5 else ''}: {type(e).__name__}: {e}", file=sys.stderr)
        traceback.print_exc(limit=4)
        return None


def to_markdown(res: dict) -> str:
    cols = ["model", "weights", "batch", "adapters", "graphs", "overlap", "decode_tps", "step_ms", "roofline_tps",
            "frac_roofline", "hf_peft_decode_tps", "ratio_vs_hf_peft"]

    def fmt(v) -> str:  # noqa: ANN001
        return f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = [f"# End-to-end decode ({res['device']}, peak {res['peak_tbps']} TB/s; prompt {res['prompt_len']}, "
             f"{res['new_tokens']} new tokens, HF {res['hf_new_tokens']})", "",
             f"Command: `{res.get('command', 'python benchmarks/e2e_decode.py')}`", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in res["rows"]]
    if res.get("overlap") == "ab":
        lines += ["", "Overlapped steps, on vs off (same engine, measured one after the other). Decode tok/s excludes "
                  "the first step; the request's whole time (prefill included) is the check that needs no step "
                  "boundary (on a CPU the ahead step runs inside the first step, which flatters decode tok/s):", "",
                  "| model | weights | batch | adapters | graphs | off tok/s | on tok/s | on / off | off s | on s "
                  "| off s / on s |", "|---" * 11 + "|"]
        key = ("model", "weights", "batch", "adapters", "graphs")
        off = {tuple(r[k] for k in key): r for r in res["rows"] if r.get("overlap") is False}
        for r in res["rows"]:
            base = off.get(tuple(r[k] for k in key))
            if r.get("overlap") is True and base is not None:
                lines.append("| " + " | ".join(fmt(r[k]) for k in key) + f" | {base['decode_tps']:.4g} | "
                             f"{r['decode_tps']:.4g} | {r['decode_tps'] / base['decode_tps']:.3f} | "
                             f"{base['total_s']:.4g} | {r['total_s']:.4g} | {base['total_s'] / r['total_s']:.3f} |")
    if res["skipped"]:
        lines += ["", "Skipped (budget): " + "; ".join(res["skipped"])]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--hf-new-tokens", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=1024)
    ap.add_argument("--peak-tbps", type=float, default=None, help="roofline (default: by device name, inlaid.bench.hardware)")
    ap.add_argument("--budget-s", type=float, default=270.0)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-7b", action="store_true")
    ap.add_argument("--w4-b1-only", action="store_true",
                    help="short run: only the W4 g128 Llama-2-7B-shaped model at batch 1 (graphs, then eager)")
    ap.add_argument("--w4-only", action="store_true", help="skip the bf16 Llama-2-7B-shaped model")
    ap.add_argument("--rows", default="", help="just these graphed 7B W4 rows (with --w4-only; no SmolLM2 rows), "
                    "'batch:adapters,...', adapter-free rows first (a loaded slot makes LoRA active)")
    ap.add_argument("--overlap", choices=("auto", "on", "off", "ab"), default="auto",
                    help="overlapped engine steps per row: the engine's default, on, off, or both (off, then on)")
    ap.add_argument("--dtype-7b", choices=("bfloat16", "float16"), default="bfloat16",
                    help="activations of the Llama-2-7B-shaped engine (the SmolLM2 rows stay bf16)")
    ap.add_argument("--out", default="benchmarks/results/e2e_decode")
    args = ap.parse_args()
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    if args.peak_tbps is None:
        args.peak_tbps = peak_bandwidth_tbps(dev)
    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    rows: list = []
    skipped: list = []
    if not args.skip_7b:  # the headline rows first: a tight budget cuts the SmolLM2 / PEFT rows instead
        bench_7b(args, rows, skipped, deadline)
    if not args.w4_b1_only and not args.rows:
        bench_small(args, rows, skipped, deadline)
    res = {"device": dev, "command": "python benchmarks/e2e_decode.py " + " ".join(sys.argv[1:]),
           "peak_tbps": args.peak_tbps, "overlap": args.overlap, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
           "hf_new_tokens": args.hf_new_tokens, "rows": [r for r in rows if r], "skipped": skipped,
           "elapsed_s": time.monotonic() - t0}
    write_results(args.out, res, to_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
