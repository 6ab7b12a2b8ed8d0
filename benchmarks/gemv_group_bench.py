"""Decode-sized W4A16 of sibling projections (q/k/v, gate/up): one grouped launch vs one launch per weight.

Same run, same GPU, Llama-2-7B shapes, group 128, fp16, x of M rows (``--ms``): ``separate`` = ``w4a16_linear``
per weight (what the decode step ran before), ``grouped`` = ``w4a16_linear_group`` (one ``w4a16_gemv_m1_group``
launch at M = 1, one ``w4a16_tc_group`` launch at 2..128), ``cublas_fp16`` = one dense matmul per weight. Timing: ``inlaid.bench.graph_timing`` over enough weight
copies (> 3x L2) that every call reads DRAM; the grouped outputs are checked against the separate ones first.

    python benchmarks/gemv_group_bench.py --ms 1,8,32 --out benchmarks/results/gemv_group_h200   # GPU, ~1 min
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
from inlaid.bench.pages import write_results
from inlaid.kernels import w4a16_gemm as wk  # noqa: E402

DEV, GS, L2_BYTES = "cuda", 128, 60 << 20
GROUPS = {"q/k/v (3 x 4096x4096)": (4096, (4096, 4096, 4096)), "gate/up (2 x 4096x11008)": (4096, (11008, 11008)),
          "q/k/v GQA-8 (4096x4096 + 2 x 4096x1024)": (4096, (4096, 1024, 1024))}


def random_w4(k: int, n: int) -> wk.PackedW4:
    hi, g = 2**31 - 1, k // GS
    return wk.prepare_w4(torch.randint(-hi - 1, hi, (k // 8, n), dtype=torch.int32, device=DEV),
                         torch.randint(-hi - 1, hi, (g, n // 8), dtype=torch.int32, device=DEV),
                         (torch.rand(g, n, device=DEV) * 0.002 + 0.0005).half(), None, GS)


def run(ms: tuple[int, ...]) -> list[dict]:
    rows = [{"event": "env", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}]
    for name, (k, widths) in GROUPS.items():
        w4_bytes = sum(k * n // 2 + k // GS * n * 5 // 2 for n in widths)
        sets = [[random_w4(k, n) for n in widths] for _ in range(max(2, -(-3 * L2_BYTES // w4_bytes)))]
        dense = [[torch.randn(k, n, device=DEV, dtype=torch.float16) for n in widths]
                 for _ in range(max(2, -(-3 * L2_BYTES // (2 * k * sum(widths)))))]
        none = [None] * len(widths)
        for m in ms:
            x = torch.randn(m, k, device=DEV, dtype=torch.float16)
            grouped = wk.w4a16_linear_group(x, sets[0], none)
            for y, p in zip(grouped, sets[0]):
                torch.testing.assert_close(y, wk.w4a16_linear(x, p), atol=2e-3, rtol=2e-3)
            row = {"event": "time", "group": name, "m": m,
                   "separate_us": graph_time_us([lambda s=s: [wk.w4a16_linear(x, p) for p in s] for s in sets]),
                   "grouped_us": graph_time_us([lambda s=s: wk.w4a16_linear_group(x, s, none) for s in sets]),
                   "cublas_fp16_us": graph_time_us([lambda d=d: [x @ w for w in d] for d in dense]),
                   "w4_bytes": w4_bytes}
            row["speedup"] = row["separate_us"] / row["grouped_us"]
            row["grouped_TBps"] = w4_bytes / row["grouped_us"] / 1e6
            rows.append(row)
            print(json.dumps(row), flush=True)
        del sets, dense
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="writes <out>.json and <out>.md")
    ap.add_argument("--ms", default="1", help="comma-separated batch sizes M (rows of x)")
    args = ap.parse_args()
    t0 = time.time()
    rows = run(tuple(int(v) for v in args.ms.split(",")))
    env = rows[0]
    lines = [f"# W4A16 of sibling projections: grouped vs separate launches ({env['gpu']}, torch "
             f"{env['torch']}, triton {env['triton']})", "",
             f"Command: `python benchmarks/gemv_group_bench.py {' '.join(sys.argv[1:])}` ({time.time() - t0:.0f} s). "
             "us per group of calls, CUDA graph over weight copies > 3x L2, group 128, fp16.", "",
             "| weights | M | fp16 cuBLAS | separate W4 | grouped W4 | grouped vs separate | grouped TB/s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['group']} | {r['m']} | {r['cublas_fp16_us']:.2f} | {r['separate_us']:.2f} | "
              f"{r['grouped_us']:.2f} | {r['speedup']:.2f}x | {r['grouped_TBps']:.2f} |" for r in rows[1:]]
    write_results(args.out, rows, "\n".join(lines) + "\n", indent=0, echo=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
