"""The dynamic-addition results page (``benchmarks/dynamic_page.py``): one run renders as the driver writes
it, several runs get one section each with their own status line and command, and the numbers on the page
are the JSON's (checked on the committed CPU result JSONs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))

from dynamic_page import load_run, merge_page  # noqa: E402

RUNS = [RESULTS / "dynamic.json", RESULTS / "dynamic_cpu_duty05.json"]


def _runs(paths):
    return [load_run(p) for p in paths]


def test_one_run_is_one_page_with_its_numbers():
    (args, res), = _runs(RUNS[:1])  # fmt: skip
    page = merge_page([(args, res)])
    assert page.startswith("# Dynamic task addition: SmolLM2-135M-Instruct (bundled `default`) on ")
    assert page.count("**Status:** measured") == 1 and f"Command: `{res['command']}`" in page
    ph = res["load"]["phases"]
    for name in ("before", "during", "after"):
        assert f"| {name} | {ph[name]['seconds']:.1f} | {ph[name]['requests']} |" in page
        assert f"| {ph[name]['tok_per_s']:.1f} |" in page
    for t, v in res["eval"]["requantized"].items():
        assert f"| {v['nll']:.4f} |" in page, t


def test_several_runs_get_a_section_each_with_their_own_status_and_command(tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("## Reading\n\nhand-written\n")
    runs = _runs(RUNS)
    page = merge_page(runs, notes)
    lines = page.splitlines()
    assert lines[0] == "# Dynamic task addition: 2 runs"
    sections = [i for i, line in enumerate(lines) if line.startswith("## ") and line[3].isdigit()]
    assert len(sections) == 2 and page.rstrip().endswith("hand-written")
    for k, (start, (args, res)) in enumerate(zip(sections, runs)):
        end = sections[k + 1] if k + 1 < len(sections) else lines.index("## Reading")
        body = "\n".join(lines[start:end])
        assert f"duty cycle {args.duty_cycle}" in lines[start] and res["device"] in lines[start]
        assert body.count("**Status:** measured") == 1 and f"Command: `{res['command']}`" in body
        dip = res["load"]["phases"]["during"]["tok_per_s"] / res["load"]["phases"]["before"]["tok_per_s"] - 1
        assert f"Throughput dip during the addition: **{100 * dip:+.1f}%**" in body
        assert "\n## " not in body[3:]  # the run's own sections are one level down
    single = merge_page(runs[:1]).splitlines()  # the same run alone: the same lines, one heading level up
    merged = lines[sections[0] + 1 : sections[1]]
    promoted = [line[1:] if line.startswith("##") else line for line in merged]
    assert "\n".join(single[1:]).strip() == "\n".join(promoted).strip()


def test_a_dummy_run_without_quality_renders(tmp_path):
    args, res = load_run(RUNS[0])
    res = {k: v for k, v in res.items() if k not in ("eval", "paired")}
    path = tmp_path / "dummy.json"
    path.write_text(json.dumps({**res, "args": {**vars(args), "load_format": "dummy", "model": "llama2-7b-shapes"}}))
    page = merge_page(_runs([RUNS[0], path]))
    assert "## 2. cpu (2 cores), llama2-7b-shapes" in page and page.count("Quality: every task") == 1


def test_not_a_results_json_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a dynamic.py results JSON"):
        load_run(bad)
    with pytest.raises(ValueError, match="at least one run"):
        merge_page([])
