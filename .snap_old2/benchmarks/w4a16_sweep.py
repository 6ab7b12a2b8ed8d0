"""Device sweep of the W4A16 GEMV configs (issue 8): correctness of EVERY candidate, then timing, then the table.

1. Correctness: each candidate ``GemvConfig`` runs on fresh random inputs in
   fp16 and bf16, at two M values of its M bucket, on the shape it is swept
   for (g128) and on a partial-last-group act-order shape (K=576, N=1536,
   g128, same tile and mode, split capped at its K steps); the output is
   NaN-poisoned first and then fully checked against the torch reference
   (``gptq_dequant``: fp32 dequantize + matmul), rel. error <= 1e-2 of max|ref|
   (fp16) / 2e-2 (bf16), and the fixup semaphores must be left zeroed.
   Failing candidates are dropped (and listed).
2. Timing (fp16, ``triton.testing.do_bench`` median, L2 flushed): per shape
   and M bucket, every surviving candidate, the untuned default and fp16
   cuBLAS (``x @ W`` dense) in the same run; the fastest correct config wins.
   For M in 32..256 the tiled kernel vs dequantize+cuBLAS gives the crossover
   (``fused_max_m``).
3. Writes ``<out>.json`` (the table, ``w4a16_configs`` format, keyed by the GPU
   name) and ``<out>_points.json`` (every measurement), prints ratios vs cuBLAS
   and bandwidth vs 3.0 TB/s; ``--install`` writes the table over
   ``inlaid/kernels/w4a16_configs.json``, keeping the M = 1 entries that
   ``benchmarks/gemv_m1_bench.py --write-table`` put there (its sweep covers
   the M = 1 kernel's one-launch split-K mode).

    python benchmarks/w4a16_sweep.py --out /tmp/w4a16_configs --install --budget-s 150
    python benchmarks/w4a16_sweep.py --device cpu --quick --out /tmp/sweep   # interpreter smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first triton import

import torch

from inlaid.bench.hardware import peak_bandwidth_tbps
from inlaid.kernels import gptq_dequant
from inlaid.kernels import w4a16_configs as wc
from inlaid.kernels import w4a16_gemm as wk
from inlaid.kernels.w4a16_gemv import GemvConfig, gemv_block_m

PEAK_BW = peak_bandwidth_tbps(torch.cuda.get_device_name() if torch.cuda.is_available() else "") * 1e12
GS = 128
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (576, 1536), (1536, 576)]  # (K, N)
FUSED_MS = [32, 64, 128, 256]
TILES_FMA = [(64, 128, 4), (128, 128, 4), (128, 256, 8), (256, 128, 8)]  # (block_n, block_k, num_warps)
TILES_DOT = [(32, 128, 4), (64, 128, 4), (64, 256, 4), (128, 128, 8)]
PROGRAMS_PER_SM = (4, 8)


def candidates(mb: int, n: int, k: int, num_sms: int) -> list[GemvConfig]:
    """Candidate configs for M bucket ``mb`` on (K, N): tiles x split-K modes x programs in flight."""
    dot = mb > 4
    out = []
    for bn, bk, nw in TILES_DOT if dot else TILES_FMA:
        k_tiles = -(-k // bk)
        for pps in PROGRAMS_PER_SM:
            split = max(1, min(-(-pps * num_sms // -(-n // bn)), k_tiles))
            for mode in ("fixup", "atomic"):
                out.append(GemvConfig(bn, bk, split, nw, dot, mode, 2))
    return list(dict.fromkeys(out))


def random_w4(k: int, n: int, act_order: bool, device: str) -> dict:
    hi, g = 2**31 - 1, -(-k // GS)
    w = {"qweight": torch.randint(-hi - 1, hi, (k // 8, n), device=device, dtype=torch.int32),
         "qzeros": torch.randint(-hi - 1, hi, (g, n // 8), device=device, dtype=torch.int32),
         "scales": (torch.rand(g, n, device=device) * 0.01 + 1e-3).half(),
         "g_idx": ((torch.randperm(k, device=device) if act_order else torch.arange(k, device=device)) // GS).int()}
    w["packed"] = wk.prepare_w4(w["qweight"], w["qzeros"], w["scales"], w["g_idx"], GS)
    w["ref_w"] = gptq_dequant.dequantize_gptq(w["qweight"], w["qzeros"], w["scales"].float(), w["g_idx"], 4)
    return w


def check_config(cfg: GemvConfig, m: int, w: dict, dtype: torch.dtype) -> str | None:
    """None if correct, else why not."""
    p = w["packed"]
    k, n = p.in_features, p.out_features
    x = torch.randn(m, k, device=p.qweight.device, dtype=dtype)
    out = torch.full((m, n), float("nan"), device=x.device, dtype=dtype)
    try:
        y = wk.w4a16_gemv(x, p.qweight, p.qzeros, p.scales, p.perm, p.group_size, cfg, out=out, locks=p.locks)
    except Exception as e:  # noqa: BLE001 - a candidate failing to compile is dropped, the sweep goes on
        return f"{type(e).__name__}: {str(e)[:160]}"
    ref = (x.float() @ w["ref_w"]).double()
    if not torch.isfinite(y).all():
        return "unwritten/NaN outputs"
    err = float((y.double() - ref).abs().max() / ref.abs().max())
    if err > (1e-2 if dtype == torch.float16 else 2e-2):
        return f"rel err {err:.3g}"
    if int(p.locks.abs().sum()):
        return "semaphores not reset"
    return None


def _warm(jobs: list[tuple[dict, int, int, int]]) -> int:
    """Worker: run each (config, M, K, N) once in fp16 and bf16 so its compiled kernels land in Triton's disk cache."""
    done = 0
    for cfg_d, m, k, n in jobs:
        try:
            w = random_w4(k, n, False, "cuda")
            for dt in (torch.float16, torch.bfloat16):
                check_config(GemvConfig(**cfg_d), m, w, dt)
            done += 1
        except Exception:  # noqa: BLE001 - the main process re-runs and reports every candidate anyway
            pass
    return done


def precompile(jobs: list[tuple[dict, int, int, int]], procs: int, timeout_s: float) -> None:
    """Compile the candidates in ``procs`` processes (Triton's cache is shared on disk): the sweep then mostly hits it."""
    import concurrent.futures as cf
    import multiprocessing as mp

    t0 = time.monotonic()
    chunks = [jobs[i::procs] for i in range(procs)]
    with cf.ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn")) as ex:
        futs = [ex.submit(_warm, c) for c in chunks if c]
        done, _ = cf.wait(futs, timeout=timeout_s)
        n = sum(f.result() for f in done if f.exception() is None)
        for f in futs:
            f.cancel()
    print(f"precompiled {n}/{len(jobs)} candidate kernels in {time.monotonic() - t0:.0f}s ({procs} processes)",
          flush=True)


def compile_jobs(shapes: list[tuple[int, int]], args) -> list[tuple[dict, int, int, int]]:
    """One job per distinct compiled variant: (tile, mode, dot) x M values of each bucket; split is a runtime arg."""
    seen, jobs = set(), []
    for k, n in shapes:
        for mb in args.m_buckets:
            for cfg in [wk.default_gemv_config(mb, n, k)] + candidates(mb, n, k, args.num_sms):
                for m in sorted({mb, max(1, mb - 1)}):
                    key = (cfg.block_n, cfg.block_k, cfg.num_warps, cfg.use_dot, cfg.mode, cfg.num_stages,
                           gemv_block_m(m, cfg.use_dot), m == 1, m % 16 == 0)  # Triton specializes M == 1 and M % 16
                    if key not in seen:
                        seen.add(key)
                        jobs.append(({**cfg.to_dict(), "split_k": 4}, m, 1024, 512))
    return jobs


def check_candidate(cfg: GemvConfig, mb: int, ws: list[dict]) -> str | None:
    """None when ``cfg`` is correct on every check (both dtypes, M = mb and mb - 1, every weight), else why not."""
    for w in ws:
        for dt in (torch.float16, torch.bfloat16):
            for m in sorted({mb, max(1, mb - 1)}):
                why = check_config(cfg, m, w, dt)
                if why is not None:
                    return f"{dt} M={m} {w['packed'].in_features}x{w['packed'].out_features}: {why}"
    return None


def bench(fn) -> float:
    """Median microseconds (triton do_bench, L2 flushed); one timed call on CPU (interpreter smoke runs)."""
    import triton.testing

    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    return float(triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")) * 1e3


def w4_bytes(k: int, n: int, m: int) -> int:
    g = -(-k // GS)
    return k * n // 2 + g * n * 2 + g * n // 2 + m * k * 2 + m * n * 2


def sweep_shape(k: int, n: int, partial: dict, args, deadline: float, log: dict) -> dict[str, GemvConfig]:
    """Best correct config per M bucket for (K, N); records every point in ``log``."""
    w = random_w4(k, n, False, args.device)
    dense = w["ref_w"].half()
    best_per_m = {}
    for mb in args.m_buckets:
        x = torch.randn(mb, k, device=args.device, dtype=torch.float16)
        p = w["packed"]
        run = lambda c: wk.w4a16_gemv(x, p.qweight, p.qzeros, p.scales, None, GS, c, locks=p.locks)
        cublas = bench(lambda: x @ dense)
        default = wk.default_gemv_config(mb, n, k)
        best = (float("inf"), default)
        for cfg in dict.fromkeys([default] + candidates(mb, n, k, args.num_sms)):  # the default is checked too
            if time.monotonic() > deadline:
                log["skipped"].append(f"{k}x{n} M{mb} {cfg}: time budget")
                continue
            why = check_candidate(cfg, mb, [w, partial])
            if why is not None:
                log["dropped"].append(f"{k}x{n} M{mb} {cfg}: {why}")
                continue
            t = bench(lambda: run(cfg))
            log["points"].append({"shape": f"{k}x{n}", "M": mb, "config": cfg.to_dict(), "us": t,
                                  "default": cfg == default})
            best = min(best, (t, cfg), key=lambda b: b[0])
        if best[0] == float("inf"):
            continue  # nothing correct was measured: no entry, the default applies
        best_per_m[str(mb)] = best[1]
        bw = w4_bytes(k, n, mb) / (best[0] * 1e-6) / 1e12
        row = {"shape": f"{k}x{n}", "M": mb, "cublas_fp16_us": cublas, "best_us": best[0], "ratio_vs_cublas":
               cublas / best[0], "TBps": bw, "frac_of_peak": bw * 1e12 / PEAK_BW, "config": best[1].to_dict()}
        log["best"].append(row)
        print(f"{k}x{n} M={mb:2d}: cuBLAS {cublas:7.1f}us  gemv {best[0]:7.1f}us  {cublas / best[0]:5.2f}x  "
              f"{bw:5.2f} TB/s ({bw * 1e12 / PEAK_BW:.0%} of {PEAK_BW / 1e12:.1f})  {best[1]}", flush=True)
    return best_per_m


def crossover(k: int, n: int, args, log: dict) -> int:
    """Largest M (of FUSED_MS) up to which the tiled kernel beats dequantize + cuBLAS (0: never)."""
    w = random_w4(k, n, False, args.device)
    p, dense, fmax, ok = w["packed"], w["ref_w"].half(), 0, True
    for m in args.fused_ms:
        x = torch.randn(m, k, device=args.device, dtype=torch.float16)
        tiled = bench(lambda: wk.w4a16_gemm(x, p.qweight, p.qzeros, p.scales, None, GS))
        deq = bench(lambda: wk.w4a16_linear(x, p, fused_max_m=0, gemv_max_m=0))
        cublas = bench(lambda: x @ dense)
        log["fused"].append({"shape": f"{k}x{n}", "M": m, "tiled_us": tiled, "dequant_mm_us": deq,
                             "cublas_fp16_us": cublas})
        print(f"{k}x{n} M={m:3d}: tiled {tiled:7.1f}us  dequant+mm {deq:7.1f}us  cuBLAS {cublas:7.1f}us", flush=True)
        ok = ok and tiled <= deq
        fmax = m if ok else fmax
    return max(fmax, wk.GEMV_MAX_M)  # M <= 16 is the GEMV's anyway


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="prefix: writes <out>.json (table) and <out>_points.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop checking/timing new candidates after this")
    ap.add_argument("--install", action="store_true", help="copy the table to inlaid/kernels/w4a16_configs.json")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU interpreter smoke run)")
    ap.add_argument("--precompile-procs", type=int, default=8, help="processes compiling candidates first (CUDA)")
    args = ap.parse_args()
    args.m_buckets, args.fused_ms, args.num_sms = list(wc.M_BUCKETS), FUSED_MS, 132
    shapes = SHAPES
    if args.device == "cuda":
        args.num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    if args.quick:
        shapes, args.m_buckets, args.fused_ms, args.num_sms = [(256, 64)], [1, 8], [32], 2
        TILES_FMA[:], TILES_DOT[:] = [(32, 128, 4)], [(32, 128, 4)]
    t0 = time.monotonic()
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    log = {"gpu": gpu, "points": [], "best": [], "fused": [], "dropped": [], "skipped": []}
    if args.device == "cuda" and args.precompile_procs > 1:
        try:
            precompile(compile_jobs(shapes, args), args.precompile_procs, timeout_s=0.5 * args.budget_s)
        except Exception as e:  # noqa: BLE001 - only a speed-up: the sweep compiles what is missing itself
            print(f"precompile failed ({type(e).__name__}: {e}); compiling in the sweep", flush=True)
    partial = random_w4(576, 1536 if not args.quick else 64, True, args.device)
    gemv, fused = {}, {}
    for k, n in shapes:
        gemv[wc.shape_key(n, k)] = {mb: c.to_dict() for mb, c in
                                    sweep_shape(k, n, partial, args, t0 + args.budget_s, log).items()}
        fused[wc.shape_key(n, k)] = crossover(k, n, args, log)
    key = next((s for s in ("H100", "H200", "A100", "L40S") if s in gpu), gpu)
    table = {"version": 1, "_note": f"written by benchmarks/w4a16_sweep.py on {gpu} in {time.monotonic() - t0:.0f}s",
             "gpus": {key: {"gemv": gemv, "fused_max_m": fused}}}
    wc.parse_table(table)  # the table must load back
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(table, indent=1))
    Path(f"{out}_points.json").write_text(json.dumps(log, indent=1))
    print(f"dropped {len(log['dropped'])} incorrect candidates; skipped {len(log['skipped'])}")
    for d in log["dropped"]:
        print("  DROPPED", d)
    if args.install:
        kept = keep_m1_entries(table, key)
        wc.TABLE_PATH.write_text(json.dumps(table, indent=1) + "\n")
        print(f"installed {wc.TABLE_PATH}" + (f"; kept gemv_m1_bench's M = 1 entries for {kept}" if kept else ""))
    return 0


def keep_m1_entries(table: dict, gpu_key: str) -> list[str]:
    """Carry the installed table's M = 1 entries of ``gpu_key`` over into ``table`` when ``gemv_m1_bench.py``
    wrote them (``_note_m1``): its M = 1 sweep covers the one-launch split-K mode and tiles this sweep does not."""
    try:
        old = json.loads(wc.TABLE_PATH.read_text())
    except (OSError, ValueError):
        return []
    if "_note_m1" not in old:
        return []
    kept = []
    new_gemv = table["gpus"][gpu_key]["gemv"]
    for shape, entries in old.get("gpus", {}).get(gpu_key, {}).get("gemv", {}).items():
        if "1" in entries:
            new_gemv.setdefault(shape, {})["1"] = entries["1"]
            kept.append(shape)
    table["_note_m1"] = old["_note_m1"]
    wc.parse_table(table)
    return kept


if __name__ == "__main__":
    sys.exit(main())
