"""W4A16 on the tensor-core layout (``w4a16_tcl``) vs the GPTQ-layout kernels vs fp16 cuBLAS, M = 1..256 (issue 8).

Same run, same GPU, Llama-2-7B shapes, group 128, fp16 (``--dtype bfloat16``: bf16 x, outputs and dense
weights; the scales stay fp16). Per shape and M: ``cublas_fp16`` (dense weights),
``gptq`` (``w4a16_linear`` on the checkpoint's layout: the GEMV at M = 1, ``w4a16_tc`` at 2..128, dequantize +
cuBLAS above) and ``tcl`` (``w4a16_linear`` on the same weights in the tensor-core layout, as a served model
gets them: ``w4a16_tcl`` to ``TCL_MAX_M`` rows, dequantize + cuBLAS above). ``--sweep-m1`` adds ``TclConfig``
candidates of the M = 1 GEMV (``m1_<block_n>_w<warps>_s<stages>_p<programs per SM>``), ``--sweep`` those of the
tensor-core step (``tc_<block_m>_<block_n>_w<warps>_s<stages>_p<programs per SM>``, M = 2..256: tiles of
min(64, M) rows, and 128 rows from M = 128); with ``--groups`` both sweep the grouped launch instead. Timing:
``inlaid.bench.graph_timing`` over enough weight copies (> 3x L2) that every call reads DRAM. Every
implementation is checked against the fp32 reference (rel. error < 1e-2; split-K buffers left zeroed) before
it is timed. TB/s counts the packed words, zeros and scales once.

    python benchmarks/tcl_bench.py --ms 128,192,256 --out benchmarks/results/tcl_m256_h100  # GPU, ~30 s
    python benchmarks/tcl_bench.py --sweep --ms 64,128,192,256 --out benchmarks/results/tcl_big_m_sweep_h100
    python benchmarks/tcl_bench.py --sweep-m1 --sweep --out benchmarks/results/tcl_h100  # + config sweeps, ~3 min
    python benchmarks/tcl_bench.py --groups --ms 1,8,16,32,64,128 --out benchmarks/results/tcl_group_h100
    python benchmarks/tcl_bench.py --groups --sweep-m1 --ms 1 --out benchmarks/results/tcl_group_m1_sweep_h100
    python benchmarks/tcl_bench.py --groups --sweep --ms 2,8,16 --out benchmarks/results/tcl_group_sweep_h100
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inlaid.bench.graph_timing import graph_time_us  # noqa: E402
from inlaid.kernels import gptq_dequant  # noqa: E402
from inlaid.kernels import w4a16_gemm as wk  # noqa: E402
from inlaid.kernels import w4a16_tcl as tcl  # noqa: E402
from inlaid.bench.w4_inputs import random_w4, scratch_clean  # noqa: E402

DEV, GS, L2_BYTES = "cuda", 128, 60 << 20
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
MS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
M1_SWEEP = {f"m1_{bn}_w{w}_s{st}_p{p}": tcl.TclConfig(16, bn, w, st, p)
            for bn, w, st, p in itertools.product((128, 256, 512), (4, 8), (1, 2, 3), (2, 4, 8, 16)) if bn >= 16 * w}
SWEEP = {f"tc_{bm}_{bn}_w{w}_s{st}_p{p}": tcl.TclConfig(bm, bn, w, st, p)
         for bm in (16, 32, 64, 128) for bn, w, st, p in (
             *itertools.product((64,), (4,), (2, 3, 4), (1, 2, 4, 6, 8)),
             *itertools.product((128,), (4,), (2, 3), (1, 2, 4)),
             *itertools.product((128,), (8,), (2, 3), (1, 2)), *itertools.product((256,), (8,), (2,), (1, 2)))}
ROWS: list[dict] = []
DTYPE = torch.float16
AGREE = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
"""Largest max|candidate - installed| / max|installed| a grouped sweep candidate may show: another split or tile
only reorders fp32 sums, so the outputs differ by at most an ulp of the output dtype (2**-11 / 2**-8 relative)."""


def log(**kw) -> None:
    ROWS.append(kw)
    print(json.dumps(kw), flush=True)






def run(ms: tuple[int, ...], shapes, sweep_m1: bool, sweep: bool) -> None:
    log(event="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        dtype=str(DTYPE).removeprefix("torch."))
    for k, n in shapes:
        w4_bytes = k * n // 2 + k // GS * n * 5 // 2
        raw = [random_w4(k, n, GS, DEV) for _ in range(max(2, -(-3 * L2_BYTES // w4_bytes)))]
        packs = {lay: [wk.prepare_w4(c["qweight"], c["qzeros"], c["scales"], c["g_idx"], GS, layout=lay) for c in raw]
                 for lay in ("gptq", "tc")}
        copies = max(2, -(-3 * L2_BYTES // (2 * k * n)))
        dense = [torch.randn(k, n, device=DEV, dtype=DTYPE) for _ in range(copies)]
        for m in ms:
            x = torch.randn(m, k, device=DEV, dtype=DTYPE)
            out = torch.empty(m, n, device=DEV, dtype=DTYPE)
            ref = gptq_dequant.gptq_linear(x.float(), raw[0]["qweight"], raw[0]["qzeros"], raw[0]["scales"].float(),
                                           raw[0]["g_idx"], 4)
            impls = {"cublas_fp16": (dense, lambda d: torch.matmul(x, d, out=out)),
                     "gptq": (packs["gptq"], lambda p: wk.w4a16_linear(x, p)),
                     "tcl": (packs["tc"], lambda p: wk.w4a16_linear(x, p))}
            if sweep_m1 and m == 1:
                impls.update({name: (packs["tc"], lambda p, c=cfg: tcl.w4a16_tcl(x, p, config=c))
                              for name, cfg in M1_SWEEP.items()})
            if sweep and 2 <= m <= tcl.TCL_MAX_M:  # row tiles of min(64, M) rows (padded to 16); 128 from M = 128
                impls.update({name: (packs["tc"], lambda p, c=cfg: tcl.w4a16_tcl(x, p, config=c))
                              for name, cfg in SWEEP.items() if cfg.block_m in _sweep_rows(m)})
            for name, (copies, call) in impls.items():
                row = {"shape": f"{k}x{n}", "m": m, "impl": name}
                try:
                    if name != "cublas_fp16":
                        err = _max_rel_err([call(copies[0])], [ref])
                        torch.cuda.synchronize()
                        if not (err < 1e-2 and scratch_clean()):
                            log(event="wrong", err=err, **row)
                            continue
                        row["err"] = err
                    row["us"] = graph_time_us([lambda c=c: call(c) for c in copies])
                    row["tbps"] = w4_bytes / row["us"] / 1e6
                    if not scratch_clean():
                        log(event="wrong", err="split-K scratch left dirty", **row)
                        continue
                    log(event="time", **row)
                except Exception as e:  # noqa: BLE001 - one failing candidate must not stop the run
                    log(event="fail", err=repr(e)[:300], **row)
        del raw, packs, dense
        torch.cuda.empty_cache()


GROUPS = {"q/k/v": (4096, (4096, 4096, 4096)), "gate/up": (4096, (11008, 11008))}


def _sweep_rows(m: int) -> set[int]:
    """Row tiles a sweep tries at M rows: min(64, M) padded to 16, and 128 from M = 128."""
    return {min(64, max(16, 1 << (m - 1).bit_length()))} | ({128} if m >= 128 else set())


def _max_rel_err(ys: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> float:
    """Largest max|y - ref| / max|ref| over the siblings."""
    return max(float((y.float() - ref).abs().max() / ref.abs().max()) for y, ref in zip(ys, refs))


def run_groups(ms: tuple[int, ...], sweep_m1: bool = False, sweep: bool = False) -> None:
    """Sibling weights of one x (Llama-2-7B q/k/v, gate/up) in the tensor-core layout: ``w4a16_linear_group`` as
    installed vs one ``w4a16_linear`` per weight, each checked against the reference first; with ``sweep_m1`` also
    ``w4a16_tcl_group`` at M = 1 under every ``M1_SWEEP`` config, with ``sweep`` at M >= 2 under the ``SWEEP``
    configs of M's row tiles (each candidate checked against the reference and against the installed launch's
    outputs, ``AGREE``)."""
    log(event="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        dtype=str(DTYPE).removeprefix("torch."))
    for label, (k, widths) in GROUPS.items():
        copies = max(2, -(-3 * L2_BYTES // (k * sum(widths) // 2)))
        raw = [[random_w4(k, n, GS, DEV) for n in widths] for _ in range(copies)]
        sets = [[wk.prepare_w4(r["qweight"], r["qzeros"], r["scales"], r["g_idx"], GS, layout="tc") for r in rs]
                for rs in raw]
        for m in ms:
            x = torch.randn(m, k, device=DEV, dtype=DTYPE)
            refs = [gptq_dequant.gptq_linear(x.float(), r["qweight"], r["qzeros"], r["scales"].float(), r["g_idx"], 4)
                    for r in raw[0]]
            row, installed = {"group": label, "m": m}, None
            try:
                installed = wk.w4a16_linear_group(x, sets[0], [None] * len(widths))
                if not _max_rel_err(installed, refs) < 1e-2 or not scratch_clean():
                    raise ValueError("grouped result differs from the reference")
                row["grouped"] = graph_time_us([lambda s=s: wk.w4a16_linear_group(x, s, [None] * len(s))
                                                for s in sets])
                row["separate"] = graph_time_us([lambda s=s: [wk.w4a16_linear(x, p) for p in s] for s in sets])
                log(event="group", **row)
            except Exception as e:  # noqa: BLE001 - one failing row must not stop the run
                log(event="fail", err=repr(e)[:300], **row)
            cands = M1_SWEEP if sweep_m1 and m == 1 and installed is not None else {}
            if sweep and m >= 2 and installed is not None:
                cands = {name: cfg for name, cfg in SWEEP.items() if cfg.block_m in _sweep_rows(m)}
            for name, cfg in cands.items():
                cand = {"group": label, "m": m, "impl": name}
                try:
                    got = tcl.w4a16_tcl_group(x, sets[0], cfg)
                    err, off = _max_rel_err(got, refs), _max_rel_err(got, installed)
                    if not (err < 1e-2 and off < AGREE[DTYPE] and scratch_clean()):
                        log(event="wrong", err=err, off_installed=off, **cand)
                        continue
                    cand["us"] = graph_time_us([lambda s=s, c=cfg: tcl.w4a16_tcl_group(x, s, c) for s in sets])
                    log(event="group_sweep", err=err, **cand)
                except Exception as e:  # noqa: BLE001
                    log(event="fail", err=repr(e)[:300], **cand)
        del raw, sets
        torch.cuda.empty_cache()


def _label(env: dict) -> str:
    return {"float16": "fp16", "bfloat16": "bf16"}[env.get("dtype", "float16")]


def rejected_line() -> str:
    bad = [r for r in ROWS if r.get("event") in ("wrong", "fail")]
    return f"Rejected (wrong or failed): {len(bad)}" + ("" if not bad else f": {bad}")


def groups_markdown(seconds: float, command: str) -> str:
    env = next(r for r in ROWS if r.get("event") == "env")
    lines = [f"# Grouped sibling launches on the tensor-core layout ({env['gpu']}, torch {env['torch']}, triton "
             f"{env['triton']})", "", f"Command: `{command}` ({seconds:.0f} s). us per call of all siblings, CUDA "
             f"graph over weight copies > 3x L2, group 128, {_label(env)}. `grouped`: `w4a16_linear_group` as installed "
             "(one launch where `tcl_group_config` says so, else one per weight); `separate`: one `w4a16_linear` "
             "per weight.", "", "| siblings | M | separate | grouped | separate / grouped |", "|---|---|---|---|---|"]
    for r in ROWS:
        if r.get("event") == "group":
            lines.append(f"| {r['group']} | {r['m']} | {r['separate']:.2f} | {r['grouped']:.2f} | "
                         f"{r['separate'] / r['grouped']:.2f} |")
    sweep = [r for r in ROWS if r.get("event") == "group_sweep"]
    if sweep:
        lines += ["", "The grouped launch under each swept config (`--sweep-m1`: `M1_SWEEP` at M = 1; `--sweep`: `SWEEP` at "
                  "M >= 2), the fastest five per group and M against the installed `grouped` time:"]
        for label in GROUPS:
            for m in sorted({r["m"] for r in sweep if r["group"] == label}):
                inst = next((r["grouped"] for r in ROWS if r.get("event") == "group" and r["group"] == label
                             and r["m"] == m), None)
                best = sorted((r["us"], r["impl"]) for r in sweep if r["group"] == label and r["m"] == m)[:5]
                if best and inst:
                    lines.append(f"- {label}, M = {m} (installed {inst:.2f} us): "
                                 + ", ".join(f"{i} {us:.2f} ({inst / us:.3f}x)" for us, i in best))
    return "\n".join(lines + ["", rejected_line()]) + "\n"


def to_markdown(seconds: float, command: str) -> str:
    env = next(r for r in ROWS if r.get("event") == "env")
    t = {(r["shape"], r["m"], r["impl"]): r["us"] for r in ROWS if r.get("event") == "time"}
    lines = [f"# W4A16 on the tensor-core layout vs the GPTQ layout vs {_label(env)} cuBLAS ({env['gpu']}, torch "
             f"{env['torch']}, triton {env['triton']})", "",
             f"Command: `{command}` ({seconds:.0f} s). us per call, CUDA graph over weight copies > 3x L2, group 128, "
             f"{_label(env)}; x = cuBLAS time / this time. `gptq`: `w4a16_linear` on the checkpoint's layout (the GEMV at "
             "M = 1, `w4a16_tc` at 2..128, dequantize + cuBLAS above); `tcl`: `w4a16_linear` on the tensor-core "
             "layout (`w4a16_tcl` to `TCL_MAX_M` rows, dequantize + cuBLAS above); TB/s of the W4 bytes at `tcl`.", "",
             f"| shape (KxN) | M | cuBLAS {_label(env)} | gptq | x | tcl | x | tcl vs gptq | tcl TB/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    shapes = sorted({r["shape"] for r in ROWS if "shape" in r}, key=lambda s: [int(v) for v in s.split("x")])
    ms = sorted({r["m"] for r in ROWS if "m" in r})
    for s in shapes:
        k, n = (int(v) for v in s.split("x"))
        w4_bytes = k * n // 2 + k // GS * n * 5 // 2
        for m in ms:
            cb, g, c = (t.get((s, m, i)) for i in ("cublas_fp16", "gptq", "tcl"))
            if cb is None:
                continue
            f = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
            x = lambda v: "" if v is None else f"{cb / v:.2f}"  # noqa: E731
            lines.append(f"| {s} | {m} | {f(cb)} | {f(g)} | {x(g)} | {f(c)} | {x(c)} | "
                         f"{'' if g is None or c is None else f'{g / c:.2f}'} | "
                         f"{'' if c is None else f'{w4_bytes / c / 1e6:.2f}'} |")
    sweep = [(r["us"], r["shape"], r["impl"]) for r in ROWS if r.get("event") == "time" and r["impl"].startswith("m1_")]
    if sweep:
        names = sorted({i for _, _, i in sweep})
        geo = {i: 1.0 for i in names}
        for us, s, i in sweep:
            geo[i] *= us / t[(s, 1, "tcl")]
        best = sorted(names, key=lambda i: geo[i])[:5]
        lines += ["", f"M = 1 sweep ({len(names)} configs): geometric-mean time vs the installed default, best five: "
                  + ", ".join(f"{i} {geo[i] ** (1 / len(shapes)):.3f}" for i in best)]
        for s in shapes:
            row = sorted((us, i) for us, s2, i in sweep if s2 == s)[:3]
            lines.append(f"- {s}: " + ", ".join(f"{i} {us:.2f} us" for us, i in row))
    tc_rows = [(r["us"], r["shape"], r["m"], r["impl"]) for r in ROWS
               if r.get("event") == "time" and r["impl"].startswith("tc_")]
    if tc_rows:
        n_cfg = len({i for *_, i in tc_rows})
        lines += ["", f"Tensor-core step sweep ({n_cfg} configs): the fastest three per shape and M (us), against "
                  "`tcl` (the installed default)"]
        for s in shapes:
            for m in ms:
                row = sorted((us, i) for us, s2, m2, i in tc_rows if s2 == s and m2 == m)[:3]
                if row:
                    lines.append(f"- {s}, M = {m}: " + ", ".join(f"{i} {us:.2f}" for us, i in row)
                                 + f" (tcl {t[(s, m, 'tcl')]:.2f})")
    return "\n".join(lines + ["", rejected_line()]) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="writes <out>.json and <out>.md")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="comma-separated batch sizes M")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="comma-separated KxN")
    ap.add_argument("--sweep-m1", action="store_true", help="also time the M = 1 GEMV's TclConfig candidates (with "
                    "--groups: the grouped launch's)")
    ap.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16", help="x, outputs, dense weights")
    ap.add_argument("--groups", action="store_true", help="instead: q/k/v and gate/up grouped vs one launch each")
    ap.add_argument("--sweep", action="store_true", help="also time the tensor-core step's TclConfig candidates "
                    "(2 <= M <= 256, tiles of min(64, M) rows and of 128 rows from M = 128; with --groups: "
                    "the grouped launch's)")
    args = ap.parse_args()
    global DTYPE
    DTYPE = getattr(torch, args.dtype)
    ms = tuple(int(v) for v in args.ms.split(","))
    shapes = tuple(tuple(int(v) for v in kn.split("x")) for kn in args.shapes.split(","))
    command = "python benchmarks/tcl_bench.py " + " ".join(sys.argv[1:])
    t0 = time.time()
    try:
        if args.groups:
            run_groups(ms, args.sweep_m1, args.sweep)
        else:
            run(ms, shapes, args.sweep_m1, args.sweep)
    finally:  # a killed or failing run still leaves what it measured
        ROWS.append({"event": "end", "seconds": time.time() - t0})
        Path(args.out + ".json").write_text(json.dumps(ROWS, indent=0))
        if any(r.get("event") == "env" for r in ROWS):
            page = groups_markdown if args.groups else to_markdown
            Path(args.out + ".md").write_text(page(time.time() - t0, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
