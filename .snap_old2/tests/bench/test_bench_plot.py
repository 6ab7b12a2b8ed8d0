"""``inlaid bench plot``: PNGs from fixture result JSONs (no server), line grouping, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inlaid.bench.plot import METRICS, load_results, plot_results, series
from inlaid.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _result(label: str, rate: float, tasks: int, tps: float, slo: float | None) -> dict:
    return {"config": {"label": label, "rate": rate, "num_tasks": tasks, "workload": {}},
            "summary": {"throughput_tps": tps, "latency_mean": 10.0 / tps, "jct_mean": 20.0 / tps,
                        "slo_attainment": slo}, "records": []}


@pytest.fixture
def result_files(tmp_path: Path) -> list[str]:
    files = []
    for label, speed in (("inlaid", 2.0), ("fifo", 1.0)):
        for rate in (4.0, 1.0, 2.0):  # out of order on purpose
            for tasks in (10, 100):
                p = tmp_path / f"{label}_{rate}_{tasks}.json"
                p.write_text(json.dumps(_result(label, rate, tasks, speed * rate * 10 / tasks, 0.5 if rate < 4 else None)))
                files.append(str(p))
    return files


def test_series_groups_by_label_and_other_dimension(result_files):
    res = load_results(result_files)
    lines = series(res, "rate", "throughput_tps")
    assert sorted(lines) == ["fifo, 10 tasks", "fifo, 100 tasks", "inlaid, 10 tasks", "inlaid, 100 tasks"]
    assert lines["inlaid, 10 tasks"] == [(1.0, 2.0), (2.0, 4.0), (4.0, 8.0)]  # sorted by x
    assert [x for x, _ in series(res, "rate", "slo_attainment")["fifo, 10 tasks"]] == [1.0, 2.0]  # None dropped
    one_rate = [r for r in res if r["config"]["rate"] == 2.0]
    by_tasks = series(one_rate, "tasks", "latency_mean")
    assert sorted(by_tasks) == ["fifo", "inlaid"] and by_tasks["fifo"] == [(10.0, 5.0), (100.0, 50.0)]


def test_plot_writes_pngs(result_files, tmp_path):
    out = tmp_path / "plots"
    paths = plot_results(result_files, "rate", out, prefix="t")
    assert [p.name for p in paths] == [f"t_{m}_vs_rate.png" for m, _ in METRICS]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000  # a real figure, not an empty file


def test_plot_cli(result_files, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["bench", "plot", *result_files, "--x", "tasks", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == len(METRICS) and all(Path(p).is_file() for p in printed)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"serving_{m}_vs_tasks.png" for m, _ in METRICS)


def test_plot_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"records": []}))
    assert main(["bench", "plot", str(bad), "--out", str(tmp_path)]) == 2
    assert "is not a `inlaid bench serve` result" in capsys.readouterr().err
    assert main(["bench", "plot", str(tmp_path / "nope.json"), "--out", str(tmp_path)]) == 2
    assert "no such result file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="x must be one of"):
        series([], "length", "jct_mean")
