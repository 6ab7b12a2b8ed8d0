"""Programmatic dependent launch (PDL) for the M = 1 W4 GEMV: chained decode-like calls in one CUDA graph.

A decode step at batch 1 is a chain of short kernels, each reading the previous one's output. Launched with
PDL, a GEMV's programs start while the kernel before still runs; ``PDL=1`` only waits (``gdc_wait``) at the
top, ``PDL=2`` first prefetches the program's weight words into L2 (weights never depend on the previous
kernel), then waits. Chains (weights in copies > 3x L2, Llama-2-7B shapes 4096x4096 -> 4096x11008 ->
11008x4096 repeated, every GEMV's x is the previous output):
- ``gemv``: GEMVs back to back;
- ``norm``: an RMSNorm (``rms_norm_triton``) before each GEMV with K = 4096, with or without
  ``gdc_launch_dependents`` at its top (``trigger``), the pattern of a transformer layer.
Every variant's final output is checked against the PDL-off chain run eagerly. Prints us per GEMV, GB/s of
W4 bytes, and the ratio to PDL off measured in the same run.

    python benchmarks/pdl_bench.py --out benchmarks/results/pdl_h200      # GPU, < 1 min
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
from inlaid.kernels import w4a16_gemm as wk  # noqa: E402
from inlaid.kernels.rms_norm import rms_norm_triton  # noqa: E402
from inlaid.kernels.w4a16_gemv import w4a16_gemv  # noqa: E402

DEV, GS, L2_BYTES = "cuda", 128, 60 << 20
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
ROWS: list[dict] = []


def log(**kw) -> None:
    ROWS.append(kw)
    print(json.dumps(kw), flush=True)


def random_w4(k: int, n: int):
    hi, g = 2**31 - 1, -(-k // GS)
    return wk.prepare_w4(torch.randint(-hi - 1, hi, (k // 8, n), dtype=torch.int32, device=DEV),
                         torch.randint(-hi - 1, hi, (g, n // 8), dtype=torch.int32, device=DEV),
                         (torch.rand(g, n, device=DEV) * 0.002 + 0.0005).half(),
                         torch.arange(k, device=DEV, dtype=torch.int32) // GS, GS)


def w4_bytes(p) -> int:
    return p.qweight.numel() * 4 + p.qzeros.numel() * 4 + p.scales.numel() * 2


def chain(packs, x0, norm_w, pdl: int, norm: bool, trigger: bool):
    """The chain's calls (closures over fixed buffers, graph-capturable) and its final output buffer."""
    bufs = [torch.empty(1, p.out_features, device=DEV, dtype=torch.float16) for p in packs]
    calls = []
    for i, p in enumerate(packs):
        src = x0 if i == 0 else bufs[i - 1]
        normed = norm and p.in_features == 4096  # the RMSNorm output feeds the GEMV directly: no copy between

        def call(s=src, p=p, o=bufs[i], normed=normed):
            x = rms_norm_triton(s, norm_w, 1e-5, pdl_trigger=trigger) if normed else s
            return w4a16_gemv(x, p.qweight, p.qzeros, p.scales, None, GS, out=o, locks=p.locks, acc=p.acc, pdl=pdl)
        calls.append(call)
    return calls, bufs[-1]


def run() -> None:
    log(event="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    copies = max(2, -(-3 * L2_BYTES // sum(k * n // 2 for k, n in SHAPES)))
    packs = [random_w4(k, n) for _ in range(copies) for k, n in SHAPES]
    total = sum(w4_bytes(p) for p in packs)
    x0 = torch.randn(1, 4096, device=DEV, dtype=torch.float16)
    norm_w = torch.rand(4096, device=DEV, dtype=torch.float16) + 0.5
    for norm in (False, True):
        calls, out = chain(packs, x0, norm_w, 0, norm, False)
        for c in calls:
            c()
        ref = out.float().clone()
        base = None
        for pdl in (0, 1, 2):
            for trigger in ((False, True) if norm else (False,)):
                if pdl == 0 and trigger:
                    continue
                row = {"chain": "norm" if norm else "gemv", "pdl": pdl, "trigger": trigger}
                try:
                    calls, out = chain(packs, x0, norm_w, pdl, norm, trigger)
                    us = graph_time_us([lambda: [c() for c in calls]], reps=20) / len(packs)
                    err = float((out.float() - ref).abs().max() / ref.abs().max())  # after the replays
                    if not err < 1e-2:
                        log(event="wrong", err=err, **row)
                        continue
                    base = base or us
                    log(event="time", us_per_gemv=us, gbs=total / len(packs) / us / 1e3, x_off=base / us, err=err,
                        **row)
                except Exception as e:  # noqa: BLE001 - one failing variant must not stop the run
                    log(event="fail", err=repr(e)[:300], **row)


def to_markdown(seconds: float, command: str) -> str:
    env = next(r for r in ROWS if r.get("event") == "env")
    lines = [f"# PDL for the M = 1 W4 GEMV in chained calls ({env['gpu']}, torch {env['torch']}, triton "
             f"{env['triton']})", "", f"Command: `{command}` ({seconds:.0f} s). One CUDA graph per chain "
             "(Llama-2-7B shapes repeated, weights > 3x L2), best of 20 replays; us per GEMV (a `norm` chain's "
             "RMSNorm time included); GB/s = W4 bytes per GEMV / time; x = PDL off / this, same run.", "",
             "| chain | PDL | RMSNorm trigger | us per GEMV | GB/s | x |", "|---|---|---|---|---|---|"]
    names = {0: "off", 1: "wait only", 2: "L2 prefetch + wait"}
    for r in ROWS:
        if r.get("event") == "time":
            lines.append(f"| {r['chain']} | {names[r['pdl']]} | {'yes' if r['trigger'] else ''} | "
                         f"{r['us_per_gemv']:.2f} | {r['gbs']:.0f} | {r['x_off']:.2f} |")
    bad = [r for r in ROWS if r.get("event") in ("wrong", "fail")]
    lines += ["", f"Rejected (wrong or failed): {len(bad)}" + ("" if not bad else f": {bad}")]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="writes <out>.json and <out>.md")
    args = ap.parse_args()
    t0 = time.time()
    try:
        run()
    finally:
        ROWS.append({"event": "end", "seconds": time.time() - t0})
        Path(args.out + ".json").write_text(json.dumps(ROWS, indent=0))
        if any(r.get("event") == "env" for r in ROWS):
            Path(args.out + ".md").write_text(to_markdown(time.time() - t0,
                                                          "python benchmarks/pdl_bench.py " + " ".join(sys.argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
