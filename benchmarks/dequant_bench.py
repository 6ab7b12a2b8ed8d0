"""W4 dequantize (``inlaid.kernels.w4_dequant.dequantize_w4``, the large-M path: dequantize, then cuBLAS) vs the
GPU's copy bandwidth, on the Llama-2-7B and SmolLM2 shapes (issue 8).

Timing: ``inlaid.bench.graph_time_us`` (one CUDA graph of calls over distinct weight copies, best replay / calls,
launch-free). Bytes = packed weight + zeros + scales read + the dense bf16 [K, N] written. The reference in the
same run is a device-to-device copy of a bf16 tensor of the output's size (``copy_``: the same bytes written,
twice as many read), so ``x copy`` says how close the kernel comes to what the GPU moves. Every output is
checked bit-exact against the torch path first (``gptq_dequant.dequantize_gptq``).

    python benchmarks/dequant_bench.py --out benchmarks/results/dequant_h100   # GPU, ~20 s
    PYTHONPATH=/tmp/old python benchmarks/dequant_bench.py --out /tmp/old_dequant   # another tree, same GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inlaid.bench.graph_timing import graph_time_us  # noqa: E402
from inlaid.bench.pages import write_results
from inlaid.kernels import gptq_dequant  # noqa: E402
from inlaid.kernels.w4_dequant import dequantize_w4  # noqa: E402

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (576, 1536), (1536, 576))
GROUP = 128


def random_w4(k: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hi = 2**31 - 1
    groups = -(-k // GROUP)
    qweight = torch.randint(-hi - 1, hi, (k // 8, n), generator=gen, dtype=torch.int32)
    qzeros = torch.randint(-hi - 1, hi, (groups, n // 8), generator=gen, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=gen) * 0.01).to(torch.bfloat16)
    return qweight.cuda(), qzeros.cuda(), scales.cuda()


def measure(k: int, n: int) -> dict:
    gen = torch.Generator().manual_seed(k * 7 + n)
    qw, qz, sc = random_w4(k, n, gen)
    g_idx = torch.arange(k, device="cuda", dtype=torch.int32) // GROUP
    ref = gptq_dequant.dequantize_gptq(qw, qz, sc, g_idx, 4)  # bf16 scales: bf16, cast once from fp32
    got = dequantize_w4(qw, qz, sc, GROUP, torch.bfloat16)
    if not torch.equal(got, ref):
        raise AssertionError(f"{k}x{n}: dequantize_w4 differs from the torch reference")
    out_bytes = k * n * 2
    copies = max(2, -(-3 * 50_000_000 // (qw.numel() * 4)))  # packed weights over > 3x an H100's 50 MB L2
    packs = [(qw.clone(), qz.clone(), sc.clone()) for _ in range(copies)]
    us = graph_time_us([lambda p=p: dequantize_w4(p[0], p[1], p[2], GROUP, torch.bfloat16) for p in packs])
    src = [torch.empty(k, n, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    dst = [torch.empty_like(s) for s in src]
    copy_us = graph_time_us([lambda s=s, d=d: d.copy_(s) for s, d in zip(src, dst)])
    moved = qw.numel() * 4 + qz.numel() * 4 + sc.numel() * 2 + out_bytes
    return {"shape": f"{k}x{n}", "dequant_us": us, "dequant_TBps": moved / us / 1e6, "copy_us": copy_us,
            "copy_TBps": 2 * out_bytes / copy_us / 1e6, "x_copy": copy_us / us}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="writes <out>.json and <out>.md")
    args = ap.parse_args()
    t0 = time.time()
    rows = [measure(k, n) for k, n in SHAPES]
    dev = torch.cuda.get_device_name()
    lines = [f"# W4 dequantize vs device copy ({dev}, torch {torch.__version__})", "",
             f"Command: `python benchmarks/dequant_bench.py --out {args.out}` ({time.time() - t0:.0f} s). us per "
             "call, graph-timed; group 128, bf16 output; TB/s = bytes read + written / time; `x copy` = copy time "
             "of the output's bytes / dequantize time (the copy reads twice the bytes the kernel reads).", "",
             "| shape (KxN) | dequantize us | TB/s | copy us | copy TB/s | x copy |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['dequant_us']:.2f} | {r['dequant_TBps']:.2f} | {r['copy_us']:.2f} | "
              f"{r['copy_TBps']:.2f} | {r['x_copy']:.2f} |" for r in rows]
    write_results(args.out, {"device": dev, "rows": rows}, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
