"""Tensor-core W4A16 (``w4a16_tc``) vs the kernels it replaces on CUDA vs fp16 cuBLAS, M = 2..256 (issue 8).

Same run, same GPU, Llama-2-7B shapes, group 128, fp16: ``cublas_fp16`` (dense weights), ``small_m``
(``w4a16_small_m`` with its default config, M <= 16), ``tc`` (``w4a16_tc`` with a few tile configs, or with
``--sweep`` every block_n x warps x stages x programs-per-SM of ``SWEEP``, with ``--swap`` those of ``SWAP_SWEEP``
(swapped operands); ``tc_default`` = the library default
for that M) and ``installed`` (``w4a16_linear``: whatever the tree's dispatcher picks). Timing:
``inlaid.bench.graph_timing`` over enough weight copies (> 3x L2) that every call reads DRAM. Every
implementation is checked against the fp32 reference (rel. error < 1e-2) before timing, and the tensor-core
kernel must leave its shared split-K scratch zeroed.

    python benchmarks/small_m_tc_bench.py --out benchmarks/results/small_m_tc_h200   # GPU, ~1 min
    python benchmarks/small_m_tc_bench.py --ms 16,32,64,128,256 --sweep --out ...   # config sweep, minutes
    python benchmarks/small_m_tc_bench.py --swap --ms 32,64,128 --out benchmarks/results/tc_swap_large_h200
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inlaid.bench.graph_timing import graph_time_us  # noqa: E402
from inlaid.bench.pages import write_results
from inlaid.bench.w4_inputs import random_w4, scratch_clean  # noqa: E402
from inlaid.kernels import gptq_dequant  # noqa: E402
from inlaid.kernels import w4a16_gemm as wk  # noqa: E402
from inlaid.kernels.w4a16_small_m import w4a16_small_m  # noqa: E402
from inlaid.kernels.w4a16_tc import tc_config, w4a16_tc  # noqa: E402

DEV, GS, L2_BYTES = "cuda", 128, 60 << 20
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
MS = (2, 4, 8, 16)
TC_CONFIGS = {"tc_n128_s1": {"block_n": 128, "num_stages": 1},
              "tc_n256_s1": {"block_n": 256, "num_stages": 1}, "tc_n128_s3": {"block_n": 128, "num_stages": 3}}
SWEEP = {f"nat_n{bn}_w{w}_s{st}_p{p}": {"block_n": bn, "num_warps": w, "num_stages": st,
                                        "programs_per_sm": p, "natural": True}
         for bn in (64, 128, 256) for w in (4, 8) for st in (2, 3, 4) for p in (1, 2)}
SWEEP.update({f"nat_m128_n{bn}_w8_s{st}_p{p}": {"block_m": 128, "block_n": bn, "num_warps": 8, "num_stages": st,
                                                 "programs_per_sm": p, "natural": True}
              for bn in (64, 128) for st in (2, 3) for p in (1, 2)})  # M >= 128 only (see run)
SWEEP.update({f"tc_n256_w{w}_s{st}_p{p}": {"block_n": 256, "num_warps": w, "num_stages": st,
                                           "programs_per_sm": p, "natural": False}
              for w, st, p in ((4, 2, 2), (4, 3, 2), (8, 3, 1))})  # the first sweep's best of the 8-dot kernel
SWAP_SWEEP = {f"swap_nat_n{bn}_w{w}_s{st}_p{p}": {  # swapped operands: natural-order step only (TcConfig)
    "block_n": bn, "num_warps": w, "num_stages": st, "programs_per_sm": p, "natural": True, "swap": True}
    for bn in (64, 128, 256) for w in (4, 8) for st in (2, 3, 4) for p in (2,)}
SWAP_SWEEP.update({f"swap_nat_n128_w4_s3_p{p}": {
    "block_n": 128, "num_warps": 4, "num_stages": 3, "programs_per_sm": p, "natural": True, "swap": True}
    for p in (1, 4)})
ROWS: list[dict] = []


def log(**kw) -> None:
    ROWS.append(kw)
    print(json.dumps(kw), flush=True)




def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))




def run(ms: tuple[int, ...], configs: dict[str, dict], shapes: tuple[tuple[int, int], ...],
        block_m: int | None = None) -> None:
    log(event="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    for k, n in shapes:
        w4_bytes = k * n // 2 + -(-k // GS) * n * 5 // 2
        raw = [random_w4(k, n, GS, DEV) for _ in range(max(2, -(-3 * L2_BYTES // w4_bytes)))]
        packed = [wk.prepare_w4(c["qweight"], c["qzeros"], c["scales"], c["g_idx"], GS) for c in raw]
        dense = [torch.randn(k, n, device=DEV, dtype=torch.float16) for _ in range(max(2, -(-3 * L2_BYTES // (2 * k * n))))]
        for m in ms:
            x = torch.randn(m, k, device=DEV, dtype=torch.float16)
            out = torch.empty(m, n, device=DEV, dtype=torch.float16)
            ref = gptq_dequant.gptq_linear(x.float(), raw[0]["qweight"], raw[0]["qzeros"], raw[0]["scales"].float(),
                                           raw[0]["g_idx"], 4)
            impls = {"cublas_fp16": (dense, lambda d: torch.matmul(x, d, out=out)),
                     "installed": (packed, lambda p: wk.w4a16_linear(x, p))}
            if m <= 16:
                impls["small_m"] = (packed, lambda p: w4a16_small_m(x, p.qweight, p.qzeros, p.scales, p.perm, GS,
                                                                    out=out, locks=p.locks))
            for name, kw in configs.items():
                if kw.get("block_m", 16) > max(16, 1 << (m - 1).bit_length()):
                    continue  # a row tile far taller than M: padding only
                # tc_default: the library's tc_config(m, n); the others name what differs from the 8-dot kernel with
                # M padded to a power of two in [16, 64] rows per tile (or --block-m)
                rows = block_m or min(64, max(16, 1 << (m - 1).bit_length()))
                cfg = tc_config(m, n) if name == "tc_default" else dataclasses.replace(
                    tc_config(m, n), **{"block_m": rows, "natural": False, "swap": False, **kw})
                impls[name] = (packed, lambda p, cfg=cfg: w4a16_tc(x, p.qweight, p.qzeros, p.scales, p.perm, GS,
                                                                 out=out, locks=p.locks, acc=p.acc, config=cfg))
            for name, (copies, call) in impls.items():
                row = {"shape": f"{k}x{n}", "m": m, "impl": name}
                try:
                    if name != "cublas_fp16":
                        out.fill_(float("nan"))
                        err = rel_err(call(copies[0]), ref)
                        torch.cuda.synchronize()
                        if not (err < 1e-2 and scratch_clean()):
                            log(event="wrong", err=err, **row)
                            continue
                        row["err"] = err
                    row["us"] = graph_time_us([lambda c=c: call(c) for c in copies])
                    if name.startswith("tc") and not scratch_clean():
                        log(event="wrong", err="split-K scratch left dirty after the timed replays", **row)
                        continue
                    log(event="time", **row)
                except Exception as e:  # noqa: BLE001 - one failing implementation must not stop the run
                    log(event="fail", err=repr(e)[:300], **row)
        del raw, packed, dense
        torch.cuda.empty_cache()


def to_markdown(seconds: float, ms: tuple[int, ...], configs: dict[str, dict], command: str,
                shapes: tuple[tuple[int, int], ...] = SHAPES) -> str:
    env = next(r for r in ROWS if r.get("event") == "env")
    t = {(r["shape"], r["m"], r["impl"]): r["us"] for r in ROWS if r.get("event") == "time"}
    lines = [f"# W4A16 at M = {ms[0]}..{ms[-1]}: tensor-core kernel vs the other W4 kernels vs fp16 cuBLAS "
             f"({env['gpu']}, torch {env['torch']}, triton {env['triton']})", "",
             f"Command: `{command}` ({seconds:.0f} s). us per call, CUDA graph over weight copies > 3x L2, group 128, "
             f"fp16. x = cuBLAS time / this time; `tc best` = fastest of {len(configs)} `w4a16_tc` configs "
             "(name: block_n, warps, stages, programs per SM); `installed` = `w4a16_linear` as this tree dispatches.",
             "", "| shape (KxN) | M | cuBLAS fp16 | small_m | x | installed | x | tc_default | x | tc best | x |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v):  # noqa: ANN001, ANN202
        return "" if v is None else f"{v:.2f}"

    for k, n in shapes:
        for m in ms:
            s = f"{k}x{n}"
            cb, sm, ins, td = (t.get((s, m, i)) for i in ("cublas_fp16", "small_m", "installed", "tc_default"))
            got = [(t[(s, m, c)], c) for c in configs if (s, m, c) in t]
            best = min(got) if got else (None, "")

            def x(v):  # noqa: ANN001, ANN202
                return "" if v is None or cb is None else f"{cb / v:.2f}"

            lines.append(f"| {s} | {m} | {f(cb)} | {f(sm)} | {x(sm)} | {f(ins)} | {x(ins)} | {f(td)} | {x(td)} | "
                         f"{f(best[0])} ({best[1]}) | {x(best[0])} |")
    bad = [r for r in ROWS if r.get("event") in ("wrong", "fail")]
    lines += ["", f"Rejected (wrong or failed): {len(bad)}" + ("" if not bad else f": {bad}")]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="writes <out>.json and <out>.md")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="comma-separated batch sizes M")
    ap.add_argument("--sweep", action="store_true", help="time every config of SWEEP (else TC_CONFIGS)")
    ap.add_argument("--swap", action="store_true", help="time the swapped-operand configs of SWAP_SWEEP")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="comma-separated KxN")
    ap.add_argument("--block-m", type=int, default=None, help="rows per tile of the configs that do not name one")
    ap.add_argument("--ppsm", default=None, help="with --sweep: only the natural-order configs, at these comma-"
                    "separated programs-per-SM values (occupancy study)")
    ap.add_argument("--merge", nargs="+", help="no GPU: merge these runs' JSON files into one page")
    args = ap.parse_args()
    ms = tuple(int(v) for v in args.ms.split(","))
    shapes = tuple(tuple(int(v) for v in kn.split("x")) for kn in args.shapes.split(","))
    configs = {"tc_default": {}, **(SWAP_SWEEP if args.swap else SWEEP if args.sweep else TC_CONFIGS)}
    if args.ppsm:
        configs = {"tc_default": {}, **{f"{name[:-3]}_p{p}": {**kw, "programs_per_sm": float(p)}
                                        for name, kw in SWEEP.items() if name.startswith("nat_n") and name.endswith("_p1")
                                        for p in args.ppsm.split(",")}}
    command = "python benchmarks/small_m_tc_bench.py " + " ".join(sys.argv[1:])
    if args.merge:
        for path in args.merge:  # the first run's env row heads the page
            ROWS.extend(r for r in json.loads(Path(path).read_text()) if r.get("event") != "env" or not ROWS)
        secs = sum(r.get("seconds", 0.0) for r in ROWS if r.get("event") == "end")
        write_results(args.out, ROWS, to_markdown(secs, ms, configs, command, shapes), indent=0, echo=False)
        return 0
    t0 = time.time()
    try:
        run(ms, configs, shapes, args.block_m)
    finally:  # a killed or failing run still leaves what it measured
        ROWS.append({"event": "end", "seconds": time.time() - t0})
        Path(args.out + ".json").write_text(json.dumps(ROWS, indent=0))
        if any(r.get("event") == "env" for r in ROWS):
            Path(args.out + ".md").write_text(to_markdown(time.time() - t0, ms, configs, command, shapes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
