"""How close is the M = 1 W4A16 GEMV to a pure read of its weights? (issue 8, the decode kernel's limit)

Per Llama-2-7B shape: a Triton kernel on the GEMV's grid (column tiles x split-K ranges) that only reads the
packed words (XOR-reduces them, so nothing is computed per element), with plain loads and with TMA loads
(``TensorDescriptor``); a device copy of the packed weights (read + write); the installed ``w4a16_linear``
(the M = 1 kernel's half2 tile on fp16/bf16 x); the same kernel's fp32 tile at the installed config; fp16
cuBLAS. ``x read floor`` = this time / the fastest read-only time: how much of a call is spent on anything
but moving the weights (the half2 tile exists because the fp32 tile's ratio was ~1.7).

Timing: ``inlaid.bench.graph_timing`` (one CUDA graph, one call per weight copy, copies > 3x L2).

    python benchmarks/gemv_read_floor.py --out benchmarks/results/gemv_read_floor_h100
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inlaid.bench.graph_timing import graph_time_us  # noqa: E402
from inlaid.bench.pages import write_results
from inlaid.kernels import w4a16_gemm as wk  # noqa: E402
from inlaid.kernels import w4a16_gemv as wg  # noqa: E402
from inlaid.kernels.w4a16_configs import gemv_config  # noqa: E402

DEV, GS, L2_BYTES = "cuda", 128, 60 << 20
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
RESULTS: list[dict] = []


def log(**kw) -> None:
    RESULTS.append(kw)
    print(json.dumps(kw), flush=True)


@triton.jit
def _read_kernel(src, out_ptr, N, KW, rows_per, BN: tl.constexpr, BR: tl.constexpr, ST: tl.constexpr,
                 TMA: tl.constexpr):
    """XOR of this program's [rows_per, BN] words into out[BN]: plain loads from the pointer ``src`` or, with
    ``TMA``, loads through the tensor descriptor ``src`` (whole [BR, BN] boxes: the last box of a range may read
    rows of the next one; zeros past the tensor)."""
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    r_lo = tl.program_id(1) * rows_per
    r_hi = tl.minimum(r_lo + rows_per, KW)
    acc = tl.zeros((BR, BN), dtype=tl.int32)
    for r0 in tl.range(r_lo, r_hi, BR, num_stages=ST):
        if TMA:
            acc ^= src.load([r0, tl.program_id(0) * BN])
        else:
            rows = r0 + tl.arange(0, BR)
            acc ^= tl.load(src + rows[:, None] * N + offs_n[None, :], mask=(rows < r_hi)[:, None] & (offs_n < N)[None, :],
                           other=0, eviction_policy="evict_first")
    tl.atomic_xor(out_ptr + offs_n, tl.xor_sum(acc, axis=0), mask=offs_n < N, sem="relaxed")


def random_w4(k: int, n: int) -> wg.PackedW4:
    hi = 2**31 - 1
    qweight = torch.randint(-hi - 1, hi, (k // 8, n), dtype=torch.int32, device=DEV)
    qzeros = torch.randint(-hi - 1, hi, (k // GS, n // 8), dtype=torch.int32, device=DEV)
    scales = (torch.rand(k // GS, n, device=DEV) * 0.002 + 0.0005).half()
    return wk.prepare_w4(qweight, qzeros, scales, None, GS)


def read_rows(k: int, n: int, packed: list, sms: int) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    kw, shape, qbytes = k // 8, f"{k}x{n}", k * n // 2
    sink = torch.zeros(n, device=DEV, dtype=torch.int32)
    for bn, br, st, per_sm in ((bn, br, st, p) for bn in (128, 256) for br in (8, 16) for st in (3, 4, 6) for p in (1, 2)):
        split = max(1, min(round(per_sm * sms / -(-n // bn)), kw // br))
        rows_per = -(-(-(-kw // br)) // split) * br
        grid = (triton.cdiv(n, bn), -(-kw // rows_per))
        for kind in ("plain", "tma"):
            srcs = [TensorDescriptor.from_tensor(p.qweight, [br, bn]) if kind == "tma" else p.qweight for p in packed]
            calls = [lambda src=src: _read_kernel[grid](src, sink, n, kw, rows_per, BN=bn, BR=br, ST=st,
                                                        TMA=kind == "tma") for src in srcs]
            try:
                t = graph_time_us(calls)
                log(event="time", shape=shape, impl=f"read_only_{kind}", us=t, tbps=qbytes / t / 1e6,
                    cfg={"bn": bn, "br": br, "stages": st, "per_sm": per_sm})
            except Exception as e:  # noqa: BLE001
                log(event="fail", shape=shape, impl=f"read_only_{kind}", err=repr(e)[:300])


def main() -> float:
    t0 = time.time()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    log(event="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    for k, n in SHAPES:
        shape, qbytes = f"{k}x{n}", k * n // 2
        wbytes = qbytes + (k // GS) * n * 2 + (k // GS) * n // 2
        packed = [random_w4(k, n) for _ in range(max(2, -(-3 * L2_BYTES // wbytes)))]
        x = torch.randn(1, k, device=DEV, dtype=torch.float16)
        dense = [torch.randn(k, n, device=DEV, dtype=torch.float16) for _ in range(max(2, -(-3 * L2_BYTES // (2 * k * n))))]
        out = torch.empty(1, n, device=DEV, dtype=torch.float16)
        t = graph_time_us([lambda d=d: torch.matmul(x, d, out=out) for d in dense])
        log(event="time", shape=shape, impl="cublas_fp16", us=t, tbps=2 * k * n / t / 1e6)
        del dense
        dst = torch.empty_like(packed[0].qweight)
        t = graph_time_us([lambda p=p: dst.copy_(p.qweight) for p in packed])
        log(event="time", shape=shape, impl="device_copy", us=t, tbps=2 * qbytes / t / 1e6)
        read_rows(k, n, packed, sms)
        t = graph_time_us([lambda p=p: wk.w4a16_linear(x, p) for p in packed])
        log(event="time", shape=shape, impl="installed_half2", us=t, tbps=wbytes / t / 1e6)
        cfg = gemv_config(x, 1, n, k)  # the same kernel and config, fp32 tile
        t = graph_time_us([lambda p=p: wg.w4a16_gemv(x, p.qweight, p.qzeros, p.scales, None, GS, cfg, out=out,
                                                     locks=p.locks, acc=p.acc, half2=False) for p in packed])
        log(event="time", shape=shape, impl="fp32_tile", us=t, tbps=wbytes / t / 1e6)
        del packed
        torch.cuda.empty_cache()
    return time.time() - t0


def to_markdown(seconds: float) -> str:
    env = next(r for r in RESULTS if r.get("event") == "env")
    best: dict = {}
    for r in RESULTS:
        if r.get("event") == "time" and ((key := (r["shape"], r["impl"])) not in best or r["us"] < best[key]["us"]):
            best[key] = r
    lines = [f"# M = 1 GEMV against a pure read of its weights ({env['gpu']}, torch {env['torch']}, "
             f"triton {env['triton']})", "",
             f"Command: `python benchmarks/gemv_read_floor.py --out ...` ({seconds:.0f} s). Graph-timed, one call per "
             "weight copy (copies > 3x L2). `read_only_*`: the fastest of 24 configs of a Triton kernel that only "
             "reads the packed words on the GEMV's grid (TB/s of the packed words); `device_copy`: read + write of "
             "the packed words (TB/s of both); `installed_half2` / `fp32_tile`: the M = 1 kernel on fp16 x at the "
             "installed config (TB/s of words + scales + zeros). x read floor = time / the fastest read-only time.",
             "", "| shape (KxN) | impl | us | TB/s | x read floor | config |", "|---|---|---|---|---|---|"]
    for shape in sorted({s for s, _ in best}):
        floor = min(r["us"] for (s, i), r in best.items() if s == shape and i.startswith("read_only"))
        for (s, impl), r in sorted(best.items()):
            if s == shape:
                lines.append(f"| {shape} | {impl} | {r['us']:.2f} | {r['tbps']:.2f} | {r['us'] / floor:.2f} | "
                             f"{r.get('cfg', '')} |")
    bad = [r for r in RESULTS if r.get("event") == "fail"]
    lines += ["", f"Configs that failed: {len(bad)}."]
    return "\n".join(lines) + "\n"


def cli() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="writes <out>.json and <out>.md")
    args = ap.parse_args()
    seconds = main()
    write_results(args.out, RESULTS, to_markdown(seconds), indent=0)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
