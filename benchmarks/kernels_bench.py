"""Kernel benchmark (issue 8): W4A16 GEMM, multi-LoRA shrink/expand, paged decode attention.

Needs CUDA. For Llama-2-7B shapes it first checks every Triton kernel against
its torch reference on the GPU (prints the max relative error), then times with
``triton.testing.do_bench`` (median, L2 flushed between runs):

- W4A16 (group 128) at M in {1..256}: fused kernel with the default config and
  the best of a small config sweep, vs fp16 cuBLAS (``x @ W`` on the dense
  fp16 weight) and vs dequantize + matmul; speedups and achieved bandwidth vs
  3.0 TB/s (bytes = packed weight + scales + zeros + x + out);
- multi-LoRA at batch 32, 32 distinct adapters, rank 16 and 64, all 7
  projections of one layer: LoRA time vs the base projections' time (fp16
  cuBLAS and fused W4A16), i.e. the LoRA overhead ratio;
- decode attention (32 heads, head_dim 128, block 16) at batch 1/32, context
  512/2048 vs the torch reference.

One failing variant prints its error and the script goes on. Prints Markdown
tables and writes ``<out>.json`` and ``<out>.md``. Finishes in a few minutes on
an H100 (``--budget-s`` caps the config sweep).

    python benchmarks/kernels_bench.py --out benchmarks/results/kernels
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inlaid.bench.hardware import peak_bandwidth_tbps  # noqa: E402
from inlaid.bench.pages import write_results

from inlaid.kernels import gptq_dequant, lora_sgmv, paged_attention  # noqa: E402
from inlaid.kernels import lora_sgmv_triton as lk  # noqa: E402
from inlaid.kernels import paged_attention_triton as pk  # noqa: E402
from inlaid.kernels import w4a16_gemm as wk  # noqa: E402

DEVICE = "cuda"  # constants below are patched only by the CPU smoke test (tests/kernels)
PEAK_BW = peak_bandwidth_tbps(torch.cuda.get_device_name() if torch.cuda.is_available() else "") * 1e12
GS = 128
CHECK_MS = (1, 3, 16, 256)
CHECK_ATTN_LENS = ([2048], [1, 100, 511, 512, 2047, 2048, 17, 300])
LORA_BATCH = 32
ATTN_POINTS = [(1, 512), (1, 2048), (32, 512), (32, 2048)]
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (K=in, N=out)
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
LAYER = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
         "gate_proj": (4096, 11008), "up_proj": (4096, 11008), "down_proj": (11008, 4096)}


def bench(fn) -> float:
    """Median milliseconds of ``fn`` (triton do_bench, L2 flushed)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def safe(label: str, errors: list[str], fn, *args):
    """Run ``fn``; on failure print and record the error, return None."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - a benchmark variant failing must not stop the run
        msg = f"{label}: {type(e).__name__}: {e}"
        print("ERROR", msg, file=sys.stderr)
        traceback.print_exc(limit=3)
        errors.append(msg)
        return None


def random_w4(k: int, n: int, gs: int = GS, act_order: bool = False) -> dict:
    """Random 4-bit GPTQ tensors on the GPU (every code and zero uniformly random)."""
    hi = 2**31 - 1
    qweight = torch.randint(-hi - 1, hi, (k // 8, n), device=DEVICE, dtype=torch.int32)
    qzeros = torch.randint(-hi - 1, hi, (k // gs, n // 8), device=DEVICE, dtype=torch.int32)
    scales = (torch.rand(k // gs, n, device=DEVICE) * 0.01 + 1e-3).half()
    g_idx = (torch.randperm(k, device=DEVICE) if act_order else torch.arange(k, device=DEVICE)) // gs
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx.to(torch.int32), "gs": gs}


def check_w4(errors: list[str]) -> list[dict]:
    rows = []
    for k, n in SHAPES:
        for act in (False, True):
            w = random_w4(k, n, act_order=act)
            packed = wk.prepare_w4(w["qweight"], w["qzeros"], w["scales"], w["g_idx"], GS)
            for m in CHECK_MS:
                for dtype in (torch.float16, torch.bfloat16):
                    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
                    ref = gptq_dequant.gptq_linear(x.float(), w["qweight"], w["qzeros"], w["scales"].float(), w["g_idx"], 4)
                    fused = wk.w4a16_gemm(x, packed.qweight, packed.qzeros, packed.scales, packed.perm, GS)
                    disp = wk.w4a16_linear(x, packed, fused_max_m=0, gemv_max_m=0)
                    tuned = wk.w4a16_linear(x, packed)
                    rows.append({"kernel": "w4a16", "shape": f"{k}x{n}", "act_order": act, "M": m, "dtype": str(dtype),
                                 "rel_err_fused": rel_err(fused, ref), "rel_err_dequant_mm": rel_err(disp, ref),
                                 "rel_err_linear_tuned": rel_err(tuned, ref)})
    return rows


def check_lora(errors: list[str]) -> list[dict]:
    rows = []
    for rank in (16, 64):
        for mod, (d_in, d_out) in LAYER.items():
            if mod not in ("q_proj", "gate_proj", "down_proj"):
                continue
            a, b, scal = lora_stacks(33, rank, d_in, d_out)
            x = torch.randn(LORA_BATCH, d_in, device=DEVICE, dtype=torch.float16)
            out = torch.randn(LORA_BATCH, d_out, device=DEVICE, dtype=torch.float16)
            slots = torch.randint(-1, 33, (LORA_BATCH,), device=DEVICE)
            ref = lora_sgmv.lora_apply(x.float(), out.float().clone(), a.float(), b.float(), scal,
                                       lora_sgmv.build_segments(slots))
            y = lk.lora_apply_triton(x, out.clone(), a, b, scal, slots)
            rows.append({"kernel": "lora", "module": mod, "rank": rank, "rel_err": rel_err(y - out, ref - out.float())})
    return rows


def check_attention(errors: list[str]) -> list[dict]:
    rows = []
    for kvh in (32, 8):
        for lens in CHECK_ATTN_LENS:
            q, cache, tables, sl = attn_inputs(lens, 32, kvh)
            qsl = torch.arange(len(lens) + 1, device=DEVICE, dtype=torch.int32)
            ref = paged_attention.paged_attention(q.float(), cache.float(), tables, sl, qsl, 1, max(lens), 128**-0.5)
            y = pk.paged_decode_attention(q, cache, tables, sl, max(lens), 128**-0.5)
            rows.append({"kernel": "decode_attn", "kv_heads": kvh, "batch": len(lens), "max_ctx": max(lens),
                         "rel_err": rel_err(y, ref)})
    return rows


def w4_bytes(k: int, n: int, m: int, gs: int = GS) -> int:
    return k * n // 2 + (k // gs) * n * 2 + (k // gs) * n // 2 + m * k * 2 + m * n * 2


def sweep_configs(m: int) -> list[wk.W4Config]:
    if m <= 16:
        return [wk.W4Config(16, bn, 128, s, 8, 4, 4) for bn, s in
                ((32, 4), (32, 8), (64, 1), (64, 2), (64, 4), (64, 8), (128, 2), (128, 4))]
    if m <= 64:
        bm = 32 if m <= 32 else 64
        return [wk.W4Config(bm, bn, bk, s, 8, 4, 4) for bn, bk, s in
                ((64, 128, 1), (64, 128, 2), (64, 128, 4), (128, 64, 1), (128, 64, 2), (32, 128, 4))]
    return [wk.W4Config(bm, bn, 64, 1, 8, nw, 3) for bm, bn, nw in
            ((64, 64, 4), (64, 128, 4), (128, 128, 8), (128, 64, 4), (128, 256, 8))]


def time_w4_point(k: int, n: int, m: int, w: dict, packed: wk.PackedW4, dense: torch.Tensor, sweep: bool) -> dict:
    """One (shape, M): cuBLAS fp16, the dispatcher with the tuned table, each kernel's default, dequant + mm."""
    x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
    args = (packed.qweight, packed.qzeros, packed.scales, packed.perm, GS)
    row = {"shape": f"{k}x{n}", "M": m}
    row["cublas_fp16_ms"] = bench(lambda: x @ dense)
    row["linear_tuned_ms"] = bench(lambda: wk.w4a16_linear(x, packed))
    row["dequant_mm_ms"] = bench(lambda: wk.w4a16_linear(x, packed, fused_max_m=0, gemv_max_m=0))
    row["fused_default_ms"] = bench(lambda: wk.w4a16_gemm(x, *args))
    best, best_cfg = row["fused_default_ms"], "default"
    for cfg in sweep_configs(m) if sweep and m > wk.GEMV_MAX_M else []:
        try:
            t = bench(lambda: wk.w4a16_gemm(x, *args, config=cfg))
        except Exception as e:  # noqa: BLE001 - one config failing to compile must not stop the sweep
            print(f"  config {cfg} failed: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            continue
        if t < best:
            best, best_cfg = t, str(cfg)
    row["fused_best_ms"], row["best_config"] = best, best_cfg
    if m <= wk.GEMV_MAX_M:
        row["gemv_default_ms"] = bench(lambda: wk.w4a16_gemv(x, *args, locks=packed.locks))
    nbytes = w4_bytes(k, n, m)
    row["linear_tuned_TBps"] = nbytes / (row["linear_tuned_ms"] * 1e-3) / 1e12
    row["linear_tuned_frac_peak_bw"] = row["linear_tuned_TBps"] * 1e12 / PEAK_BW
    row["speedup_linear_tuned_vs_cublas"] = row["cublas_fp16_ms"] / row["linear_tuned_ms"]
    row["fused_best_TBps"] = nbytes / (best * 1e-3) / 1e12
    row["speedup_best_vs_cublas"] = row["cublas_fp16_ms"] / best
    return row


def time_w4(errors: list[str], deadline: float) -> list[dict]:
    rows = []
    for k, n in SHAPES:
        w = random_w4(k, n)
        packed = wk.prepare_w4(w["qweight"], w["qzeros"], w["scales"], w["g_idx"], GS)
        dense = wk.dequantize_w4(packed.qweight, packed.qzeros, packed.scales, GS, torch.float16)
        for m in MS:
            sweep = time.monotonic() < deadline
            row = safe(f"w4a16 {k}x{n} M={m}", errors, time_w4_point, k, n, m, w, packed, dense, sweep)
            if row:
                rows.append(row)
                print(f"w4a16 {k}x{n} M={m:3d}: cuBLAS {row['cublas_fp16_ms'] * 1e3:7.1f}us  w4a16_linear "
                      f"{row['linear_tuned_ms'] * 1e3:7.1f}us ({row['speedup_linear_tuned_vs_cublas']:.2f}x, "
                      f"{row['linear_tuned_TBps']:.2f} TB/s = {row['linear_tuned_frac_peak_bw']:.0%} of {PEAK_BW / 1e12:.1f})  "
                      f"dequant+mm {row['dequant_mm_ms'] * 1e3:7.1f}us", flush=True)
    return rows


def crossover(rows: list[dict]) -> dict:
    """Per shape: largest M where the best fused kernel beats dequantize + matmul."""
    out = {}
    for row in rows:
        if row["fused_best_ms"] <= row["dequant_mm_ms"]:
            out[row["shape"]] = max(out.get(row["shape"], 0), row["M"])
        else:
            out.setdefault(row["shape"], 0)
    return out


def lora_stacks(s: int, rank: int, d_in: int, d_out: int):
    a = torch.randn(s, rank, d_in, device=DEVICE, dtype=torch.float16) / d_in**0.5
    b = torch.randn(s, d_out, rank, device=DEVICE, dtype=torch.float16) / rank**0.5
    return a, b, torch.rand(s, device=DEVICE) + 0.5


def time_lora_rank(rank: int, batch: int = 32) -> dict:
    slots = torch.arange(batch, device=DEVICE)
    mods = {}
    for mod, (d_in, d_out) in LAYER.items():
        a, b, scal = lora_stacks(batch, rank, d_in, d_out)
        x = torch.randn(batch, d_in, device=DEVICE, dtype=torch.float16)
        out = torch.zeros(batch, d_out, device=DEVICE, dtype=torch.float16)
        w = random_w4(d_in, d_out)
        packed = wk.prepare_w4(w["qweight"], w["qzeros"], w["scales"], w["g_idx"], GS)
        dense = wk.dequantize_w4(packed.qweight, packed.qzeros, packed.scales, GS, torch.float16)
        mods[mod] = (x, out, a, b, scal, packed, dense)
    seg = lora_sgmv.build_segments(slots)

    def lora_all():
        for x, out, a, b, scal, _, _ in mods.values():
            lk.lora_apply_triton(x, out, a, b, scal, slots)

    def sgmv_all():
        for x, out, a, b, scal, _, _ in mods.values():
            lora_sgmv.lora_apply(x, out, a, b, scal, seg)

    groups = [g for g in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("o_proj",), ("down_proj",))
              if all(m in mods for m in g)] + [(m,) for m in mods if m not in ("q_proj", "k_proj", "v_proj",
                                                                                  "gate_proj", "up_proj", "o_proj", "down_proj")]
    groups = [g for g in groups if g] or [(m,) for m in mods]
    if sum(len(g) for g in groups) != len(mods):
        groups = [(m,) for m in mods]
    cats = [torch.cat([mods[m][2] for m in g], dim=1) for g in groups]  # the pool's shared A buffers

    def lora_fused():  # what LoRAPool's device path launches: 4 shrinks + 7 expands per layer
        for group, a_cat in zip(groups, cats):
            part = lk.lora_shrink_partials(mods[group[0]][0], a_cat, slots)
            for j, mod in enumerate(group):
                x, out, a, b, scal, _, _ = mods[mod]
                lk.lora_expand(part[:, :, j * rank : (j + 1) * rank], b, scal, slots, out)

    row = {"rank": rank, "batch": batch, "adapters": batch}
    row["lora_triton_ms"] = bench(lora_all)
    graphed = DEVICE == "cuda"
    if graphed:  # launch-free GPU time: what a CUDA-graph decode step pays
        import triton.testing

        def gbench(fn) -> float:
            return float(triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median"))

        row["lora_fused_graph_ms"] = gbench(lora_fused)
        row["base_fp16_graph_ms"] = gbench(lambda: [m[0] @ m[6] for m in mods.values()])
        row["base_w4_graph_ms"] = gbench(lambda: [wk.w4a16_linear(m[0], m[5]) for m in mods.values()])
        row["overhead_graph_vs_fp16_base"] = row["lora_fused_graph_ms"] / row["base_fp16_graph_ms"]
        row["overhead_graph_vs_w4_base"] = row["lora_fused_graph_ms"] / row["base_w4_graph_ms"]
        lora_bytes = sum(batch * rank * (i + o) * 2 for i, o in LAYER.values())
        row["lora_bytes_MB"] = lora_bytes / 1e6
        row["lora_fused_graph_TBps"] = lora_bytes / (row["lora_fused_graph_ms"] * 1e-3) / 1e12
    else:
        row["lora_fused_ms"] = bench(lora_fused)
    row["lora_torch_sgmv_ms"] = bench(sgmv_all)
    row["base_fp16_ms"] = bench(lambda: [m[0] @ m[6] for m in mods.values()])
    row["base_w4_ms"] = bench(lambda: [wk.w4a16_linear(m[0], m[5]) for m in mods.values()])
    row["overhead_vs_fp16_base"] = row["lora_triton_ms"] / row["base_fp16_ms"]
    row["overhead_vs_w4_base"] = row["lora_triton_ms"] / row["base_w4_ms"]
    return row


def attn_inputs(lens: list[int], heads: int, kv_heads: int, block: int = 16):
    b = len(lens)
    max_blocks = -(-max(lens) // block)
    cache = torch.randn(2, b * max_blocks + 1, block, kv_heads, 128, device=DEVICE, dtype=torch.float16)
    tables = torch.randperm(b * max_blocks + 1, device=DEVICE)[: b * max_blocks].reshape(b, max_blocks)
    q = torch.randn(b, heads, 128, device=DEVICE, dtype=torch.float16)
    return q, cache, tables.to(torch.int32), torch.tensor(lens, device=DEVICE, dtype=torch.int32)


def time_attention_point(batch: int, ctx: int, kv_heads: int = 32) -> dict:
    q, cache, tables, sl = attn_inputs([ctx] * batch, 32, kv_heads)
    qsl = torch.arange(batch + 1, device=DEVICE, dtype=torch.int32)
    row = {"batch": batch, "context": ctx, "heads": 32, "kv_heads": kv_heads}
    row["triton_ms"] = bench(lambda: pk.paged_decode_attention(q, cache, tables, sl, ctx, 128**-0.5))
    row["reference_ms"] = bench(lambda: paged_attention.paged_attention(q, cache, tables, sl, qsl, 1, ctx, 128**-0.5))
    nbytes = batch * ctx * kv_heads * 128 * 2 * 2
    row["triton_TBps"] = nbytes / (row["triton_ms"] * 1e-3) / 1e12
    row["speedup_vs_reference"] = row["reference_ms"] / row["triton_ms"]
    return row


def md_table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def to_markdown(res: dict) -> str:
    us = [{**r, **{c.replace("_ms", "_us"): r[c] * 1e3 for c in r if c.endswith("_ms")}} for r in res["w4a16"]]
    parts = [
        f"# Kernel benchmark ({res['env']['device']}, torch {res['env']['torch']}, triton {res['env']['triton']})",
        "\n## Correctness on GPU (max |err| / max |ref|)\n",
        md_table(res["check_w4a16"], ["shape", "act_order", "M", "dtype", "rel_err_fused", "rel_err_dequant_mm",
                                      "rel_err_linear_tuned"]),
        "\n" + md_table(res["check_lora"], ["module", "rank", "rel_err"]),
        "\n" + md_table(res["check_attention"], ["kv_heads", "batch", "max_ctx", "rel_err"]),
        "\n## W4A16 GEMM, group 128, fp16 (do_bench median, us)\n",
        md_table(us, ["shape", "M", "cublas_fp16_us", "linear_tuned_us", "speedup_linear_tuned_vs_cublas",
                      "linear_tuned_TBps", "linear_tuned_frac_peak_bw", "gemv_default_us", "fused_default_us",
                      "fused_best_us", "dequant_mm_us", "speedup_best_vs_cublas"]),
        "\n`linear_tuned` is `w4a16_linear` with the installed `inlaid/kernels/w4a16_configs.json` (GEMV for M <= 16, "
        "tiled kernel up to the table's crossover, then dequantize + cuBLAS); bytes = packed weight + scales + zeros "
        "+ x + out.",
        f"\nFused-vs-dequant+matmul crossover (largest M where the tiled kernel wins): {res['w4a16_crossover']}",
        "\nBest tiled configs (M > 16): " + "; ".join(f"{r['shape']} M={r['M']}: {r['best_config']}"
                                                     for r in res["w4a16"] if r["M"] > 16),
        "\n## Multi-LoRA, 7 projections of a Llama-2-7B layer, batch 32, 32 distinct adapters (ms)\n",
        md_table(res["lora"], ["rank", "lora_triton_ms", "lora_torch_sgmv_ms", "base_fp16_ms", "base_w4_ms",
                               "overhead_vs_fp16_base", "overhead_vs_w4_base"]),
        "\nUnder CUDA graphs (launch-free; LoRA as the pool launches it: fused q/k/v and gate/up shrinks):\n",
        md_table(res["lora"], ["rank", "lora_fused_graph_ms", "base_fp16_graph_ms", "base_w4_graph_ms",
                               "overhead_graph_vs_fp16_base", "overhead_graph_vs_w4_base", "lora_bytes_MB",
                               "lora_fused_graph_TBps"]),
        "\n## Paged decode attention, 32 heads, head_dim 128, block 16, fp16 (ms)\n",
        md_table(res["attention"], ["batch", "context", "kv_heads", "triton_ms", "reference_ms",
                                    "speedup_vs_reference", "triton_TBps"]),
    ]
    if res["errors"]:
        parts += ["\n## Errors\n"] + [f"- {e}" for e in res["errors"]]
    return "\n".join(parts) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/kernels", help="output prefix: writes <out>.json and <out>.md")
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop the W4A16 config sweep after this many seconds")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("kernels_bench.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    t0 = time.monotonic()
    torch.manual_seed(0)
    errors: list[str] = []
    res = {"env": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "peak_bw_TBps": PEAK_BW / 1e12}, "errors": errors}
    for name, fn in (("check_w4a16", check_w4), ("check_lora", check_lora), ("check_attention", check_attention)):
        res[name] = safe(name, errors, fn, errors) or []
        worst = max((max(v for k, v in r.items() if k.startswith("rel_err")) for r in res[name]), default=float("nan"))
        print(f"{name}: max rel error {worst:.3g} over {len(res[name])} cases", flush=True)
    res["w4a16"] = time_w4(errors, deadline=t0 + args.budget_s)
    res["w4a16_crossover"] = crossover(res["w4a16"])
    res["lora"] = [r for r in (safe(f"lora rank {rk}", errors, time_lora_rank, rk, LORA_BATCH)
                                    for rk in (16, 64)) if r]
    res["attention"] = [r for r in (safe(f"attn b={b} ctx={c}", errors, time_attention_point, b, c)
                                    for b, c in ATTN_POINTS) if r]
    res["elapsed_s"] = time.monotonic() - t0
    json_path, md_path = write_results(args.out, res, to_markdown(res), indent=2)
    print(f"wrote {json_path} and {md_path} in {res['elapsed_s']:.0f}s")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
