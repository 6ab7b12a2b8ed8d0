"""M = 1 W4A16 GEMV on the GPU as a decode step sees it (issue 8): the tuned ``w4a16_linear``, a sweep of
``GemvConfig`` candidates of the M = 1 kernel (its half2 tile, ``w4a16_gemv.half2_path``), the same kernel's fp32
tile at its session-9 winners (``m1_fp32_tile``: the half2 tile's baseline in the same run), fp16 cuBLAS, and
torch's own int4 kernel (tinygemm, ``aten._weight_int4pack_mm``, bf16 only) as the reference of what a well-kept
library reaches on this GPU.

Timing: one CUDA graph holding one call per weight copy, with enough copies (> 3x the L2) that every call
reads its weights from DRAM, replayed 5 times, best replay / calls (launch-free, like a graphed decode step).
Every candidate is checked against the fp32 reference before and after its timing (output NaN-poisoned,
rel. error < 1e-2; the "fixup"/"atomic_last" buffers must be left zeroed).

    python benchmarks/gemv_m1_bench.py --out benchmarks/results/gemv_m1_h200   # GPU, all shapes
    # one process per shape (one GPU each), then one page and the tuned table's M = 1 entries:
    python benchmarks/gemv_m1_bench.py --shapes 4096x4096 --out /tmp/a
    python benchmarks/gemv_m1_bench.py --merge /tmp/a.json /tmp/b.json --out benchmarks/results/gemv_m1_h200 \
        --write-table inlaid/kernels/w4a16_configs.json
"""
import argparse
import json
import signal
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inlaid.bench.graph_timing import graph_time_us  # noqa: E402
from inlaid.kernels import gptq_dequant  # noqa: E402
from inlaid.kernels import w4a16_gemm as wk  # noqa: E402
from inlaid.kernels.w4a16_gemv import GemvConfig, w4a16_gemv  # noqa: E402

DEV = "cuda"
GS = 128
L2_BYTES = 60 << 20
RESULTS = []


def log(**kw):
    RESULTS.append(kw)
    print(json.dumps(kw), flush=True)


def gemv_call(cfg: GemvConfig, x: torch.Tensor, out: torch.Tensor, half2: bool | None = None):  # noqa: ANN201
    return lambda c: w4a16_gemv(x, c.qweight, c.qzeros, c.scales, c.perm, c.group_size, cfg, out=out, locks=c.locks,
                                acc=c.acc, half2=half2)


def random_w4(k, n):
    hi = 2**31 - 1
    g = -(-k // GS)  # K = 576 (SmolLM2) ends in a partial group
    return {"qweight": torch.randint(-hi - 1, hi, (k // 8, n), dtype=torch.int32, device=DEV),
            "qzeros": torch.randint(-hi - 1, hi, (g, n // 8), dtype=torch.int32, device=DEV),
            "scales": (torch.rand(g, n, device=DEV) * 0.002 + 0.0005).half(),
            "g_idx": torch.arange(k, device=DEV, dtype=torch.int32) // GS}


def graph_time(call, copies, reps=5):
    """us per call: a CUDA graph of one call per weight copy (``inlaid.bench.graph_timing``)."""
    return graph_time_us([lambda c=c: call(c) for c in copies], reps)


def rel_err(y, ref):
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))


SHAPES = ("4096x4096", "4096x11008", "11008x4096", "576x1536", "1536x576")
"""K x N: Llama-2-7B's projections, then SmolLM2-135M's MLP (its K = 576 ends in a partial group)."""


def candidates() -> list[dict]:
    """M = 1 kernel configs: tile width x warps (2 warps for the narrowest tiles, 4-8 for the widest), K step
    64/128 (group 128 allows <= 128), pipeline depth, programs per SM; one-launch "atomic_last" split-K."""
    out = []
    for bn, warps_set in ((32, (2,)), (64, (2, 4)), (128, (2, 4)), (256, (4, 8)), (512, (4, 8))):
        for warps in warps_set:
            for bk in (64, 128):
                for stages in (1, 3, 4):
                    for ppsm in (1, 2, 4):
                        out.append({"bn": bn, "bk": bk, "warps": warps, "stages": stages, "mode": "atomic_last",
                                    "ppsm": ppsm})
    return out


FP32_TILE = ({"bn": 256, "bk": 64, "warps": 4, "stages": 3, "mode": "atomic_last", "ppsm": 2},
             {"bn": 64, "bk": 128, "warps": 4, "stages": 1, "mode": "atomic_last", "ppsm": 2})
"""The fp32 tile's session-9 winners (``gemv_m1_h100.md``): the baseline of the half2 tile in the same run."""


def checked_err(call, p, out: torch.Tensor, ref: torch.Tensor) -> float:  # noqa: ANN001
    """One call into a NaN-poisoned ``out``: its rel. error, or inf when the semaphores / fp32 row it must
    leave zeroed are not."""
    out.fill_(float("nan"))
    call(p)
    clean = int(p.locks.abs().sum()) == 0 and float(p.acc.abs().sum()) == 0
    return rel_err(out, ref) if clean else float("inf")


def main(shapes: list[str]):
    t_start = time.time()
    name = torch.cuda.get_device_name()
    log(event="env", gpu=name, torch=torch.__version__, triton=triton.__version__)
    for (k, n) in [tuple(int(v) for v in s.split("x")) for s in shapes]:
        w4_bytes = k * n // 2 + -(-k // GS) * n * 2 + -(-k // GS) * n // 2
        ncopy = max(2, -(-3 * L2_BYTES // w4_bytes))
        copies = [random_w4(k, n) for _ in range(ncopy)]
        x = torch.randn(1, k, device=DEV, dtype=torch.float16)
        ref = gptq_dequant.gptq_linear(x, copies[0]["qweight"], copies[0]["qzeros"], copies[0]["scales"],
                                       copies[0]["g_idx"], 4)
        out = torch.empty(1, n, device=DEV, dtype=torch.float16)
        # baselines
        dense_bytes = k * n * 2
        dcopies = [torch.randn(k, n, device=DEV, dtype=torch.float16) for _ in range(max(2, -(-3 * L2_BYTES // dense_bytes)))]
        t_cublas = graph_time(lambda d, x=x, out=out: torch.matmul(x, d, out=out), dcopies)
        log(event="time", shape=f"{k}x{n}", impl="cublas_fp16", us=t_cublas, tbps=dense_bytes / t_cublas / 1e6)
        del dcopies
        packed = [wk.prepare_w4(c["qweight"], c["qzeros"], c["scales"], c["g_idx"], GS) for c in copies]
        try:
            t_cur = graph_time(lambda p, x=x: wk.w4a16_linear(x, p), packed)
            y = wk.w4a16_linear(x, packed[0])
            log(event="time", shape=f"{k}x{n}", impl="installed", us=t_cur, tbps=w4_bytes / t_cur / 1e6,
                x_cublas=t_cublas / t_cur, err=rel_err(y, ref))
        except Exception as e:  # noqa: BLE001
            log(event="fail", shape=f"{k}x{n}", impl="installed", err=repr(e)[:300])
        # tinygemm reference (bf16 only): w = (q - 8) * scale + zero, zero = (8 - z) * scale
        try:
            xb = x.bfloat16()
            for inner in (2, 4, 8):
                tg = []
                for c in copies:
                    codes = gptq_dequant.unpack_rows(c["qweight"], 4)  # [K, N]
                    zs = gptq_dequant.unpack_rows(c["qzeros"].t().contiguous(), 4).t() + 1  # [G, N]
                    wq = codes.t().contiguous()  # [N, K]
                    packed_tg = torch.ops.aten._convert_weight_to_int4pack(
                        ((wq[:, ::2] << 4) | wq[:, 1::2]).to(torch.uint8), inner)
                    sz = torch.empty(k // GS, n, 2, device=DEV, dtype=torch.bfloat16)
                    sz[..., 0] = c["scales"].bfloat16()
                    sz[..., 1] = ((8 - zs).float() * c["scales"].float()).bfloat16()
                    tg.append((packed_tg, sz))
                yb = torch.ops.aten._weight_int4pack_mm(xb, tg[0][0], GS, tg[0][1])
                t_tg = graph_time(lambda p, xb=xb: torch.ops.aten._weight_int4pack_mm(xb, p[0], GS, p[1]), tg)
                log(event="time", shape=f"{k}x{n}", impl=f"tinygemm_bf16_inner{inner}", us=t_tg,
                    tbps=w4_bytes / t_tg / 1e6, x_cublas=t_cublas / t_tg, err=rel_err(yb, ref))
                del tg
        except Exception as e:  # noqa: BLE001
            log(event="fail", shape=f"{k}x{n}", impl="tinygemm", err=repr(e)[:300])
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        for impl, cfgs in (("m1_kernel", candidates()), ("m1_fp32_tile", FP32_TILE)):
            for cfgd in cfgs:
                split = max(1, min(round(cfgd["ppsm"] * sms / -(-n // cfgd["bn"])), -(-k // cfgd["bk"])))
                cfg = GemvConfig(cfgd["bn"], cfgd["bk"], split, cfgd["warps"], False, cfgd["mode"], cfgd["stages"])
                try:
                    call = gemv_call(cfg, x, out, half2=None if impl == "m1_kernel" else False)
                    err_before = checked_err(call, packed[0], out, ref)
                    t = graph_time(call, packed)
                    err = max(err_before, checked_err(call, packed[0], out, ref))  # the replays left exact buffers
                    if not err < 1e-2:
                        log(event="wrong", shape=f"{k}x{n}", impl=impl, err=err, **cfgd)
                        continue
                    log(event="time", shape=f"{k}x{n}", impl=impl, us=t, tbps=w4_bytes / t / 1e6,
                        x_cublas=t_cublas / t, err=err, split=split, **cfgd)
                except Exception as e:  # noqa: BLE001
                    log(event="fail", shape=f"{k}x{n}", impl=impl, err=repr(e)[:200], **cfgd)
        del copies, packed
        torch.cuda.empty_cache()
    return time.time() - t_start


def best_rows() -> dict:
    """Fastest correct measurement per (shape, implementation)."""
    best: dict = {}
    for r in RESULTS:
        if r.get("event") == "time":
            key = (r["shape"], r["impl"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    return best


def to_markdown(seconds: float) -> str:
    env = next(r for r in RESULTS if r.get("event") == "env")
    best = best_rows()
    lines = [f"# M = 1 W4A16 GEMV ({env['gpu']}, torch {env['torch']}, triton {env['triton']})", "",
             "Command: `python benchmarks/gemv_m1_bench.py --out ...` "
             f"({seconds:.0f} s). CUDA graph of one call per weight copy (copies > 3x L2: every call reads DRAM), "
             "best of 5 replays; group 128; fp16 except tinygemm (bf16 only). `installed` = `w4a16_linear` with "
             "the committed tuned table; `m1_kernel` = the fastest `GemvConfig` of the sweep (half2 tile); "
             "`m1_fp32_tile` = the same kernel's fp32 tile at its session-9 winners; x cuBLAS = fp16 "
             "cuBLAS time / this time; TB/s = packed weight + scales + zeros bytes / time.", "",
             "| shape (KxN) | impl | us | TB/s | x cuBLAS fp16 | rel. err | config |", "|---|---|---|---|---|---|---|"]
    for (shape, impl), r in sorted(best.items()):
        cfg = {k: r[k] for k in ("bn", "bk", "warps", "stages", "mode", "split") if k in r}
        lines.append(f"| {shape} | {impl} | {r['us']:.2f} | {r['tbps']:.2f} | {r.get('x_cublas', 1.0):.2f} | "
                     f"{r.get('err', float('nan')):.1e} | {cfg or ''} |")
    bad = [r for r in RESULTS if r.get("event") in ("wrong", "fail")]
    lines += ["", f"Candidates rejected (wrong or failed): {len(bad)}."]
    return "\n".join(lines) + "\n"


def write_table(path: Path, page: str) -> list[str]:
    """Put the fastest correct M = 1 config of every measured shape into the tuned table (``w4a16_configs``'s
    keys: power-of-two buckets of N and K) under this GPU's name; returns the keys written."""
    from inlaid.kernels.w4a16_configs import shape_key

    env = next(r for r in RESULTS if r.get("event") == "env")
    gpu = env["gpu"].replace("NVIDIA ", "")
    table = json.loads(path.read_text())
    gemv = table["gpus"].setdefault(gpu, {}).setdefault("gemv", {})
    written = []
    for (shape, impl), r in sorted(best_rows().items()):
        if impl != "m1_kernel":
            continue
        k, n = (int(v) for v in shape.split("x"))
        key = shape_key(n, k)
        gemv.setdefault(key, {})["1"] = {"block_n": r["bn"], "block_k": r["bk"], "split_k": r["split"],
                                         "num_warps": r["warps"], "use_dot": False, "mode": r["mode"],
                                         "num_stages": r["stages"]}
        written.append(f"{key} <- {shape}")
    notes = table.get("_note_m1")
    table["_note_m1"] = {**(notes if isinstance(notes, dict) else {}),
                         gpu: f"benchmarks/gemv_m1_bench.py on {env['gpu']} ({page})"}
    path.write_text(json.dumps(table, indent=1) + "\n")
    return written


def cli() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="writes <out>.json (every measurement) and <out>.md")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), help="KxN shapes to measure (default: all)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="no GPU work: one page from earlier runs' JSON")
    ap.add_argument("--write-table", type=Path, help="also put each shape's fastest M = 1 config in this table")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still writes what was measured
    seconds = 0.0
    if args.merge:
        for f in args.merge:
            rows = json.loads(Path(f).read_text())
            has_env = any(r.get("event") == "env" for r in RESULTS)  # one env row: the runs share a GPU model
            RESULTS.extend(r for r in rows if not (has_env and r.get("event") == "env"))
            seconds = max(seconds, next((r["seconds"] for r in rows if r.get("event") == "done"), 0.0))
        Path(args.out + ".json").write_text(json.dumps(RESULTS, indent=0))
    else:
        try:
            seconds = main(args.shapes)
            log(event="done", seconds=seconds)
        finally:
            Path(args.out + ".json").write_text(json.dumps(RESULTS, indent=0))
    if any(r.get("event") == "env" for r in RESULTS):
        Path(args.out + ".md").write_text(to_markdown(seconds))
        if args.write_table:
            print("\n".join(write_table(args.write_table, Path(args.out).name + ".md")))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
