"""Hardware counters of the decode step's W4 launches under Nsight Compute (issue 8's "profile evidence").

``run`` starts ``ncu`` on this script's ``launch`` mode and turns its report into ``<out>.json`` / ``<out>.md``:
per case (Llama-2-7B shapes, group 128, bf16 x and outputs, fp16 scales; the weights in the served
tensor-core layout; and the batch-32 LoRA shrink / expand, 32 adapters of rank 16) and per kernel it launches, the time, DRAM bytes and TB/s, the SM / DRAM / tensor-pipe
shares of peak, achieved occupancy, issue-slot use, eligible warps per scheduler and the largest warp-stall
reasons (warps stalled per issued instruction, ncu's WarpStateStats). fp16-weight cuBLAS runs the same shapes
as the baseline. ncu flushes the caches before every replay (its default), so each launch reads its weights from
DRAM as a decode step does, and runs at the GPU's own clocks (``--clock-control none``, the mode seen working on
the device machines). ``source`` samples one kernel's warp stalls per SASS instruction: which instruction waits.

    python benchmarks/ncu_profile.py run --out benchmarks/results/ncu_w4_h100   # GPU + ncu, ~2 min
    python benchmarks/ncu_profile.py report --csv raw.csv --out ...              # re-render an exported report
    python benchmarks/ncu_profile.py source --kernel _w4_tcl_group_kernel --out benchmarks/results/ncu_src_h100

Invariants: ``launch`` compiles and runs every case once before ``cudaProfilerStart``, so only the profiled
launches are in the report; before each case it launches ``_case_marker`` on ``index + 1`` programs, which is how
``report`` assigns the kernels that follow (a case may launch several: split-K's cast, cuBLAS's own) to the case.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# inlaid.bench.pages imports no torch, so `report` and `source --csv` run on any machine
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inlaid.bench.pages import write_results

GS = 128
CASES: dict[str, tuple[int, int, tuple[int, ...]]] = {
    # name: (M, K, output widths); several widths = one grouped launch (q/k/v, gate/up)
    "m1_qkv": (1, 4096, (4096, 4096, 4096)),
    "m1_gateup": (1, 4096, (11008, 11008)),
    "m1_down": (1, 11008, (4096,)),
    "m16_qkv": (16, 4096, (4096, 4096, 4096)),
    "m16_gateup": (16, 4096, (11008, 11008)),
    "m16_down": (16, 11008, (4096,)),
    "m32_up": (32, 4096, (11008,)),
    "m256_up": (256, 4096, (11008,)),
    "m256_down": (256, 11008, (4096,)),
}
LORA: dict[str, tuple[str, int, int, int]] = {
    # name: (op, tokens = adapters, input width, output width); rank 16, token t uses adapter t (batch 32, 32 adapters)
    "m32_lora_shrink_down": ("shrink", 32, 11008, 16),
    "m32_lora_expand_up": ("expand", 32, 16, 11008),
}
RANK = 16
CUBLAS = ("m16_gateup", "m256_up", "m256_down")
"""Cases also run as one fp16-weight (bf16) matmul per output width: the dense baseline's counters."""
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "SchedulerStats",
            "ComputeWorkloadAnalysis")
EXTRA_METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum")
COLUMNS = {  # ncu raw metric -> (label, scale); base units (ns, bytes, ratios, percents)
    "gpu__time_duration.sum": ("us", 1e-3),
    "dram__bytes_read.sum": ("DRAM MB read", 1e-6),
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": ("SM % peak", 1.0),
    "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed": ("DRAM % peak", 1.0),
    "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active": ("tensor pipe %", 1.0),
    "sm__warps_active.avg.pct_of_peak_sustained_active": ("occupancy %", 1.0),
    "smsp__issue_active.avg.pct_of_peak_sustained_active": ("issue active %", 1.0),
    "smsp__warps_eligible.avg.per_cycle_active": ("eligible warps", 1.0),
    "launch__registers_per_thread": ("regs", 1.0),
    "launch__occupancy_limit_registers": ("blocks/SM by regs", 1.0),
    "gpc__cycles_elapsed.avg.per_second": ("GHz", 1e-9),
}
STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio")


def _marker_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _case_marker(p):
        tl.store(p + tl.program_id(0), 1)

    return _case_marker


def _case_call(name: str, dense: bool) -> Callable[[], object]:
    """A zero-argument call that runs case ``name`` once (``dense``: the fp16-weight cuBLAS baseline)."""
    import torch

    from inlaid.bench.w4_inputs import random_w4
    from inlaid.kernels import lora_sgmv_triton as lt
    from inlaid.kernels import w4a16_gemm as wk

    if name in LORA:
        op, t, d_in, d_out = LORA[name]
        slots = torch.arange(t, device="cuda", dtype=torch.int32)
        if op == "shrink":
            x, a = (torch.randn(t, d_in, device="cuda", dtype=torch.bfloat16),
                    torch.randn(t, RANK, d_in, device="cuda", dtype=torch.bfloat16) * 0.02)
            return lambda: lt.lora_shrink_partials(x, a, slots)
        parts = torch.randn(lt.default_num_splits(t, 4096), t, RANK, device="cuda")
        b = torch.randn(t, d_out, RANK, device="cuda", dtype=torch.bfloat16) * 0.02
        scal, out = torch.ones(t, device="cuda"), torch.zeros(t, d_out, device="cuda", dtype=torch.bfloat16)
        return lambda: lt.lora_expand(parts, b, scal, slots, out)
    m, k, widths = CASES[name]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    if dense:
        ws = [torch.randn(k, n, device="cuda", dtype=torch.bfloat16) * 0.02 for n in widths]
        return lambda: [x @ w for w in ws]
    packs = []
    for n in widths:
        r = random_w4(k, n, GS)
        packs.append(wk.prepare_w4(r["qweight"], r["qzeros"], r["scales"], r["g_idx"], GS, layout="tc"))
    if len(packs) > 1:  # with the fp16 copy x * 2**-7 the RMSNorm writes for bf16 x (read at M = 1, as served)
        x_half = (x.float() * 2**-7).half()
        return lambda: wk.w4a16_linear_group(x, packs, [None] * len(packs), x_half=x_half)
    return lambda: wk.w4a16_linear(x, packs[0])


def launch() -> int:
    """ncu's target: every case once unprofiled, then each behind its marker inside the profiled range."""
    import torch

    marker, flags = _marker_kernel(), torch.zeros(64, dtype=torch.int32, device="cuda")
    calls = [(name, _case_call(name, False)) for name in (*CASES, *LORA)]
    calls += [(f"{name}_cublas", _case_call(name, True)) for name in CUBLAS]
    for i, (_, call) in enumerate(calls):
        marker[(i + 1,)](flags)
        call()
    torch.cuda.synchronize()
    (Path(os.environ["NCU_PROFILE_CASES"])).write_text(json.dumps([n for n, _ in calls]))
    torch.cuda.cudart().cudaProfilerStart()
    for i, (_, call) in enumerate(calls):
        marker[(i + 1,)](flags)
        call()
        torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    return 0


def _ncu() -> str:
    found = shutil.which("ncu") or next(iter(sorted(Path("/opt/nvidia/nsight-compute").glob("*/ncu"))), None)
    if found is None:
        raise SystemExit("ncu (Nsight Compute) is not on PATH nor under /opt/nvidia/nsight-compute")
    return str(found)


def _num(s: str) -> float | None:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def parse(csv_text: str, cases: list[str]) -> list[dict]:
    """Rows of ncu's raw CSV page (header, units, one row per kernel) -> one dict per profiled case kernel."""
    rows = list(csv.reader(csv_text.splitlines()))
    start = next(i for i, r in enumerate(rows) if r and r[0] == "ID")
    header, data = rows[start], [r for r in rows[start + 2:] if len(r) == len(rows[start])]
    col = {h: i for i, h in enumerate(header)}
    out, case = [], None
    for r in data:
        name = r[col["Kernel Name"]]
        if "_case_marker" in name:
            if "launch__grid_size" in col:
                grid = _num(r[col["launch__grid_size"]])
            else:  # the "Grid Size" column reads "(2, 1, 1)"
                grid = _num(r[col["Grid Size"]].strip("()").split(",")[0])
            case = cases[int(grid) - 1] if grid else None
            continue
        rec: dict = {"case": case, "kernel": name[:60]}
        for metric, (label, scale) in COLUMNS.items():
            v = _num(r[col[metric]]) if metric in col else None
            rec[label] = None if v is None else v * scale
        stalls = {STALL.fullmatch(h).group(1): _num(r[i]) for h, i in col.items() if STALL.fullmatch(h)}
        rec["stalls"] = dict(sorted(((k, v) for k, v in stalls.items() if v), key=lambda kv: -kv[1]))
        if rec["us"] and rec["DRAM MB read"] is not None:
            rec["TB/s"] = rec["DRAM MB read"] / rec["us"]  # MB per us = TB per s
        out.append(rec)
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


def to_markdown(recs: list[dict], env: dict, command: str) -> str:
    labels = ["us", "DRAM MB read", "TB/s", "DRAM % peak", "SM % peak", "tensor pipe %", "issue active %",
              "occupancy %", "eligible warps", "regs", "blocks/SM by regs", "GHz"]
    lines = [f"# Nsight Compute counters of the W4 decode launches ({env.get('gpu', '?')})", "",
             (f"`{command}`; ncu {env.get('ncu', '?')}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}; "
              "caches flushed before each replay, GPU clocks uncontrolled (GHz: the SM clock ncu saw). us: one launch "
              "alone, its ramp-up and tail included, which back-to-back launches in a graph overlap (compare "
              "counters here, times in tcl_bench's pages). Tensor pipe: "
              "its cycles active, where the GEMV's HFMA2.MMA half2 sums also run. Stalls: warps stalled per issued "
              "instruction, largest three."), "",
             "| case | kernel | " + " | ".join(labels) + " | top stalls |",
             "|---|---|" + "---|" * len(labels) + "---|"]
    for r in recs:
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(r["stalls"].items())[:3])
        lines.append(f"| {r['case']} | `{r['kernel'][:40]}` | " + " | ".join(_fmt(r.get(lab)) for lab in labels)
                     + f" | {top} |")
    return "\n".join(lines) + "\n"


def run(out: str, keep: str | None) -> int:
    import torch
    import triton

    ncu = _ncu()
    version = subprocess.run([ncu, "--version"], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    with tempfile.TemporaryDirectory() as tmp:
        rep, names = Path(tmp) / "prof", Path(tmp) / "cases.json"
        cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--force-overwrite", "--export",
               str(rep), *[a for s in SECTIONS for a in ("--section", s)], "--metrics", ",".join(EXTRA_METRICS),
               sys.executable, __file__, "launch"]
        t0 = time.time()
        subprocess.run(cmd, check=True, env={**os.environ, "NCU_PROFILE_CASES": str(names)})
        raw = subprocess.run([ncu, "--import", f"{rep}.ncu-rep", "--csv", "--page", "raw", "--print-units", "base"],
                             check=True, capture_output=True, text=True).stdout
        if keep:  # the report, its raw page and the case order: enough for `report` to re-render
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(f"{rep}.ncu-rep", keep)
            shutil.copy(names, keep)
            (Path(keep) / "raw.csv").write_text(raw)
        recs = parse(raw, json.loads(names.read_text()))
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "ncu": version, "seconds": round(time.time() - t0, 1)}
    command = "python benchmarks/ncu_profile.py run --out " + out
    write_results(out, {"env": env, "rows": recs}, to_markdown(recs, env, command))
    return 0


def top_instructions(csv_text: str, n: int = 12) -> tuple[dict, list[dict]]:
    """ncu's SASS source page (``--page source --csv --print-source sass``) -> (sample totals by stall reason,
    the ``n`` instructions with the most warp-stall samples: the instruction, its samples, its largest reasons)."""
    rows = list(csv.reader(csv_text.splitlines()))
    start = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    header = rows[start]
    col = {h: i for i, h in enumerate(header)}
    data = [r for r in rows[start + 1:] if len(r) == len(header)]
    reasons = [h for h in header if h.startswith("stall_") and not h.endswith("(Not Issued)")]
    samples = "Warp Stall Sampling (All Samples)"
    totals = {"samples": sum(_num(r[col[samples]]) or 0 for r in data)}
    totals |= {h.removeprefix("stall_"): sum(_num(r[col[h]]) or 0 for r in data) for h in reasons}
    top = []
    for r in sorted(data, key=lambda r: -(_num(r[col[samples]]) or 0))[:n]:
        why = sorted(((h.removeprefix("stall_"), _num(r[col[h]]) or 0) for h in reasons), key=lambda kv: -kv[1])
        top.append({"sass": r[col["Source"]].strip(), "samples": _num(r[col[samples]]) or 0,
                    "reasons": {k: v for k, v in why[:3] if v}})
    return totals, top


def source(kernel: str, out: str, page_csv: str | None = None, save_csv: str | None = None) -> int:
    """Warp-stall samples per SASS instruction of the first ``kernel`` launch inside ``launch``'s profiled range
    (or of the source page ``page_csv`` exported before)."""
    if page_csv is not None:
        return _source_page(kernel, Path(page_csv).read_text(), out)
    ncu = _ncu()
    with tempfile.TemporaryDirectory() as tmp:
        rep = Path(tmp) / "src"
        subprocess.run([ncu, "--clock-control", "none", "--profile-from-start", "off", "-k", f"regex:{kernel}",
                        "--launch-count", "1", "--section", "SourceCounters", "--section", "WarpStateStats",
                        "--import-source", "no", "--force-overwrite", "--export", str(rep), sys.executable, __file__,
                        "launch"], check=True, env={**os.environ, "NCU_PROFILE_CASES": str(Path(tmp) / "cases.json")})
        page = subprocess.run([ncu, "--import", f"{rep}.ncu-rep", "--page", "source", "--csv", "--print-source",
                               "sass"], check=True, capture_output=True, text=True).stdout
    if save_csv:  # the whole page (~0.4 MB), for re-rendering with --csv
        Path(save_csv).write_text(page)
    return _source_page(kernel, page, out)


def _source_page(kernel: str, page: str, out: str) -> int:
    totals, top = top_instructions(page)
    cmd = f"python benchmarks/ncu_profile.py source --kernel {kernel} --out {out}"
    lines = [f"# Warp-stall samples by SASS instruction: `{kernel}`", "",
             f"`{cmd}`: the first launch of the kernel among `launch`'s cases (ncu SourceCounters). "
             f"{totals['samples']:.0f} samples; by reason: "
             + ", ".join(f"{k} {v / totals['samples']:.0%}" for k, v in sorted(totals.items(), key=lambda kv: -kv[1])
                         if k != "samples" and v / totals["samples"] >= 0.02) + ".", "",
             "| instruction | samples | share | largest reasons |", "|---|---|---|---|"]
    lines += [f"| `{t['sass']}` | {t['samples']:.0f} | {t['samples'] / totals['samples']:.1%} | "
              + ", ".join(f"{k} {v:.0f}" for k, v in t["reasons"].items()) + " |" for t in top]
    write_results(out, {"kernel": kernel, "totals": totals, "top": top}, "\n".join(lines) + "\n")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("run", help="profile every case under ncu and write <out>.json / <out>.md")
    r.add_argument("--out", required=True)
    r.add_argument("--keep", help="folder to keep ncu's report, its raw CSV page and cases.json in")
    sub.add_parser("launch", help="(ncu's target) run the cases inside cudaProfilerStart/Stop")
    src = sub.add_parser("source", help="warp-stall samples per SASS instruction of one kernel (ncu SourceCounters)")
    src.add_argument("--kernel", required=True, help="kernel name (a regex), e.g. _w4_tcl_group_kernel")
    src.add_argument("--out", required=True)
    src.add_argument("--csv", help="render this exported source page instead of profiling")
    src.add_argument("--save-csv", help="also save ncu's source page (CSV) here")
    rep = sub.add_parser("report", help="re-render a raw CSV page (ncu --import R --csv --page raw --print-units base)")
    rep.add_argument("--csv", required=True)
    rep.add_argument("--cases", required=True, help="JSON list of the profiled cases, in launch order")
    rep.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.mode == "launch":
        return launch()
    if args.mode == "run":
        return run(args.out, args.keep)
    if args.mode == "source":
        return source(args.kernel, args.out, args.csv, args.save_csv)
    recs = parse(Path(args.csv).read_text(), json.loads(Path(args.cases).read_text()))
    env = {"source": args.csv}
    write_results(args.out, {"env": env, "rows": recs}, to_markdown(recs, env, " ".join(sys.argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
