"""Tensor-core W4A16 (``w4a16_tc``) vs the small-M kernel it replaces on CUDA vs fp16 cuBLAS, M = 2..16 (issue 8).

Same run, same GPU, Llama-2-7B shapes, group 128, fp16: ``cublas_fp16`` (dense weights), ``small_m``
(``w4a16_small_m`` with its default config, the dispatcher's choice before), ``tc`` (``w4a16_tc`` with a few
tile configs; ``tc_default`` = the library default) and ``installed`` (``w4a16_linear``, which now dispatches
to ``w4a16_tc``). Timing: ``inlaid.bench.graph_timing`` over enough weight copies (> 3x L2) that every call
reads DRAM. Every implementation is checked against the fp32 reference (rel. error < 1e-2) before timing.

    python benchmarks/small_m_tc_bench.py --out benchmarks/results/small_m_tc_h200   # GPU, ~1 min
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inlaid.bench.graph_timing import graph_time_us  # noqa: E402
from inlaid.kernels import gptq_dequant  # noqa: E402
from inlaid.kernels import w4a16_gemm as wk  # noqa: E402
from inlaid.kernels.w4a16_small_m import w4a16_small_m  # noqa: E402
from inlaid.kernels.w4a16_tc import w4a16_tc  # noqa: E402

DEV, GS, L2_BYTES = "cuda", 128, 60 << 20
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
MS = (2, 4, 8, 16)
TC_CONFIGS = {"tc_default": {}, "tc_n128_s1": {"block_n": 128, "num_stages": 1},
              "tc_n256_s1": {"block_n": 256, "num_stages": 1}, "tc_n128_s3": {"block_n": 128, "num_stages": 3}}
ROWS: list[dict] = []


def log(**kw) -> None:
    ROWS.append(kw)
    print(json.dumps(kw), flush=True)


def random_w4(k: int, n: int) -> dict:
    hi, g = 2**31 - 1, -(-k // GS)
    return {"qweight": torch.randint(-hi - 1, hi, (k // 8, n), dtype=torch.int32, device=DEV),
            "qzeros": torch.randint(-hi - 1, hi, (g, n // 8), dtype=torch.int32, device=DEV),
            "scales": (torch.rand(g, n, device=DEV) * 0.002 + 0.0005).half(),
            "g_idx": torch.arange(k, device=DEV, dtype=torch.int32) // GS}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


def run() -> float:
    t0 = time.time()
    log(event="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    for k, n in SHAPES:
        w4_bytes = k * n // 2 + -(-k // GS) * n * 5 // 2
        raw = [random_w4(k, n) for _ in range(max(2, -(-3 * L2_BYTES // w4_bytes)))]
        packed = [wk.prepare_w4(c["qweight"], c["qzeros"], c["scales"], c["g_idx"], GS) for c in raw]
        dense = [torch.randn(k, n, device=DEV, dtype=torch.float16) for _ in range(max(2, -(-3 * L2_BYTES // (2 * k * n))))]
        for m in MS:
            x = torch.randn(m, k, device=DEV, dtype=torch.float16)
            out = torch.empty(m, n, device=DEV, dtype=torch.float16)
            ref = gptq_dequant.gptq_linear(x.float(), raw[0]["qweight"], raw[0]["qzeros"], raw[0]["scales"].float(),
                                           raw[0]["g_idx"], 4)
            impls = {"cublas_fp16": (dense, lambda d: torch.matmul(x, d, out=out)),
                     "small_m": (packed, lambda p: w4a16_small_m(x, p.qweight, p.qzeros, p.scales, p.perm, GS, out=out,
                                                                 locks=p.locks)),
                     "installed": (packed, lambda p: wk.w4a16_linear(x, p))}
            for name, kw in TC_CONFIGS.items():
                impls[name] = (packed, lambda p, kw=kw: w4a16_tc(x, p.qweight, p.qzeros, p.scales, p.perm, GS,
                                                                 out=out, locks=p.locks, acc=p.acc, **kw))
            for name, (copies, call) in impls.items():
                row = {"shape": f"{k}x{n}", "m": m, "impl": name}
                try:
                    if name != "cublas_fp16":
                        out.fill_(float("nan"))
                        err = rel_err(call(copies[0]), ref)
                        if not err < 1e-2:
                            log(event="wrong", err=err, **row)
                            continue
                        row["err"] = err
                    row["us"] = graph_time_us([lambda c=c: call(c) for c in copies])
                    log(event="time", **row)
                except Exception as e:  # noqa: BLE001 - one failing implementation must not stop the run
                    log(event="fail", err=repr(e)[:300], **row)
        del raw, packed, dense
        torch.cuda.empty_cache()
    return time.time() - t0


def to_markdown(seconds: float) -> str:
    env = next(r for r in ROWS if r.get("event") == "env")
    t = {(r["shape"], r["m"], r["impl"]): r["us"] for r in ROWS if r.get("event") == "time"}
    tcs = sorted(TC_CONFIGS)
    lines = [f"# W4A16 at M = 2..16: tensor-core kernel vs small-M kernel vs fp16 cuBLAS ({env['gpu']}, torch "
             f"{env['torch']}, triton {env['triton']})", "",
             f"Command: `python benchmarks/small_m_tc_bench.py --out ...` ({seconds:.0f} s). us per call, CUDA graph "
             "over weight copies > 3x L2, group 128, fp16. x = cuBLAS time / this time; `tc best` = fastest of "
             f"{', '.join(tcs)}; `installed` = `w4a16_linear` (dispatches to `w4a16_tc`).", "",
             "| shape (KxN) | M | cuBLAS fp16 | small_m | x | tc_default | x | tc best | installed | tc_default vs small_m |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for k, n in SHAPES:
        for m in MS:
            s = f"{k}x{n}"
            cb, sm, td, ins = (t.get((s, m, i)) for i in ("cublas_fp16", "small_m", "tc_default", "installed"))
            best = min((t[(s, m, c)], c) for c in tcs if (s, m, c) in t) if any((s, m, c) in t for c in tcs) else None

            def f(v):  # noqa: ANN001, ANN202
                return "" if v is None else f"{v:.2f}"

            def x(v):  # noqa: ANN001, ANN202
                return "" if v is None or cb is None else f"{cb / v:.2f}"

            lines.append(f"| {s} | {m} | {f(cb)} | {f(sm)} | {x(sm)} | {f(td)} | {x(td)} | "
                         f"{'' if best is None else f'{best[0]:.2f} ({best[1]})'} | {f(ins)} | "
                         f"{'' if td is None or sm is None else f'{sm / td:.2f}x'} |")
    bad = [r for r in ROWS if r.get("event") in ("wrong", "fail")]
    lines += ["", f"Rejected (wrong or failed): {len(bad)}" + ("" if not bad else f": {bad}")]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="writes <out>.json and <out>.md")
    args = ap.parse_args()
    seconds = run()
    Path(args.out + ".json").write_text(json.dumps(ROWS, indent=0))
    Path(args.out + ".md").write_text(to_markdown(seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
