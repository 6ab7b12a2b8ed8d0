"""``benchmarks/ncu_profile.py``'s report: kernels after each marker belong to that marker's case, metrics in
ncu's base units become the page's, stall reasons sort largest first, rows ncu left short are dropped."""

from __future__ import annotations

import csv
import importlib.util
import io
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STALL = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"


def _module():
    spec = importlib.util.spec_from_file_location("ncu_profile_bench", ROOT / "benchmarks" / "ncu_profile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _csv(rows: list[dict[str, str]]) -> str:
    header = ["ID", "Kernel Name", "launch__grid_size", "gpu__time_duration.sum", "dram__bytes_read.sum",
              "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
              STALL.format("long_scoreboard"), STALL.format("wait"), STALL.format("barrier")]
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL)
    w.writerow(["==PROF== noise line"])
    w.writerow(header)
    w.writerow(["", "", "", "nsecond", "byte", "%", "", "", ""])
    for i, r in enumerate(rows):
        w.writerow([str(i), *(r.get(h, "") for h in header[1:])])
    w.writerow(["99", "truncated"])
    return buf.getvalue()


def test_kernels_follow_their_marker() -> None:
    mod = _module()
    raw = _csv([
        {"Kernel Name": "_case_marker", "launch__grid_size": "1"},
        {"Kernel Name": "_w4_tcl_m1_group_kernel", "launch__grid_size": "264", "gpu__time_duration.sum": "20000",
         "dram__bytes_read.sum": "50,000,000", "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained"
         "_active": "0", STALL.format("long_scoreboard"): "1.5", STALL.format("wait"): "3.25",
         STALL.format("barrier"): "0"},
        {"Kernel Name": "_cast_kernel", "launch__grid_size": "8", "gpu__time_duration.sum": "2000",
         "dram__bytes_read.sum": "1000000"},
        {"Kernel Name": "_case_marker", "launch__grid_size": "2"},
        {"Kernel Name": "nvjet_hsh_128x64", "launch__grid_size": "132", "gpu__time_duration.sum": "40000",
         "dram__bytes_read.sum": "120000000"},
    ])
    recs = mod.parse(raw, ["m1_qkv", "m256_up_cublas"])
    assert [(r["case"], r["kernel"]) for r in recs] == [
        ("m1_qkv", "_w4_tcl_m1_group_kernel"), ("m1_qkv", "_cast_kernel"), ("m256_up_cublas", "nvjet_hsh_128x64")]
    first = recs[0]
    assert first["us"] == 20.0 and first["DRAM MB read"] == 50.0 and first["TB/s"] == 2.5
    assert list(first["stalls"]) == ["wait", "long_scoreboard"]  # largest first, zeros dropped
    assert first["tensor pipe %"] == 0.0 and recs[2]["tensor pipe %"] is None
    page = mod.to_markdown(recs, {"gpu": "H100"}, "cmd")
    assert "| m1_qkv | `_w4_tcl_m1_group_kernel` | 20.0 | 50.0 | 2.50 |" in page
    assert "wait 3.25, long_scoreboard 1.50" in page
