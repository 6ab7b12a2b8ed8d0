"""inlaid.bench.serving_page: the results page from fixture JSONs (ratios, cross-check, extra sections)."""

from __future__ import annotations

import json
from pathlib import Path

from inlaid.bench.serving_page import load_dir, write_page


def _res(label: str, rate: float, driver: str, tps: float, lat: float, slo: float) -> dict:
    extra = {"model": "m7", "quant": "w4", "adapters": "100", "policy": label}
    if driver == "engine":
        extra["driver"] = "engine"  # HTTP results carry no driver key (they predate it)
    return {"config": {"label": label, "rate": rate, "num_tasks": 100, "extra": extra},
            "summary": {"ok": 10, "sent": 10, "throughput_tps": tps, "latency_mean": lat, "jct_mean": 2 * lat,
                        "ttft_mean": 0.1, "tpot_mean": 0.01, "slo_attainment": slo}}


def _write(d: Path, name: str, obj: dict) -> None:
    (d / name).write_text(json.dumps(obj))


def test_page_ratios_cross_check_and_sections(tmp_path) -> None:
    j = tmp_path / "res" / "json"
    j.mkdir(parents=True)
    _write(j, "a.json", _res("inlaid", 8.0, "engine", 200.0, 1.0, 0.9))
    _write(j, "b.json", _res("fifo", 8.0, "engine", 100.0, 4.0, 0.09))
    _write(j, "c.json", _res("inlaid-nopred", 8.0, "engine", 150.0, 2.0, 0.45))
    _write(j, "d.json", _res("inlaid", 4.0, "engine", 120.0, 0.5, 1.0))
    _write(j, "e.json", _res("fifo", 4.0, "engine", 110.0, 0.6, 1.0))
    _write(j, "f.json", _res("inlaid", 8.0, "http", 190.0, 1.2, 0.8))
    _write(j, "m_probe.json", {"probe": {"rps": 5.3, "tps": 400.0, "mean_output": 75.0}, "isolated": None})
    _write(j, "junk.json", {"hello": 1})
    _write(tmp_path / "res", "peft_baseline.json", {"rows": [{"adapters": 8, "requests": 64, "distinct_per_batch": 5.0,
                                                              "peft_tps": 50.0, "inlaid_tps": 500.0}],
                                                    "skipped": ["100 adapters"], "note": "n"})
    _write(tmp_path / "res", "capacity.json", {"rows": [{"model": "m13", "quant": "w4", "budget_gb": 40.0,
                                                         "weights_gb": 6.8, "slot_mb": 478.0, "kv_gb": 3.1,
                                                         "max_adapters": 62, "verified": 62,
                                                         "fail_error": "N+3: OutOfMemoryError", "peak_gb": 39.0}],
                                               "note": "cap", "summary_lines": ["At 40 GB: W4 holds 62"],
                                               "verified_earlier": [{"quant": "fp16", "max_adapters": 24,
                                                                     "verified": 24, "targets": "q_proj,v_proj"}]})
    results, probes = load_dir(j)
    assert len(results) == 6 and len(probes) == 1
    md = tmp_path / "serving.md"
    assert write_page(tmp_path / "res", md, ["# T", ""])
    text = md.read_text()
    # inlaid vs fifo at rate 8: throughput 2x, latency 4x, JCT 4x, SLO 10x
    assert "| m7 | w4 | 100 | engine | 8 | 2.00x | 4.00x | 4.00x | 10.00x |" in text
    assert "| m7 | w4 | 100 | engine | 4 | 1.09x | 1.20x | 1.20x | 1.00x |" in text
    assert "| m7 | w4 | 100 | engine | 8 | 1.33x | 2.00x | 2.00x | 2.00x |" in text  # vs inlaid-nopred
    assert "| m7 | w4 | 100 | inlaid | 8 | http | 190 |" in text and "| m7 | w4 | 100 | inlaid | 8 | engine | 200 |" in text
    assert "| 8 | 64 | 5 | 50 | 500 | 10.00x |" in text and "Skipped: 100 adapters" in text
    assert "| m13 | w4 | all 7 | 40 | 6.8 | 478 | 3.1 | 62 | 62 | N+3: OutOfMemoryError | 39 |" in text
    assert "Verified earlier" in text and "| - | fp16 | q+v | - | - | - | - | 24 | 24 | - | - |" in text
    assert "| m7_probe |" not in text and "| m | 5.3 | 400 | 75 |" in text
    assert "![" in text and (tmp_path / "res" / "plots").is_dir()  # rate plots for the engine group


def test_page_not_written_without_results(tmp_path) -> None:
    (tmp_path / "json").mkdir()
    assert not write_page(tmp_path, tmp_path / "x.md", ["# T"])
    assert not (tmp_path / "x.md").exists()


def test_cpu_http_section_from_its_own_dir(tmp_path) -> None:
    res, cpu = tmp_path / "res", tmp_path / "cpu"
    (res / "json").mkdir(parents=True)
    (cpu / "json").mkdir(parents=True)
    _write(res / "json", "a.json", _res("inlaid", 8.0, "engine", 200.0, 1.0, 0.9))
    for label, tps, lat in (("inlaid", 30.0, 2.0), ("fifo", 20.0, 3.0), ("mlfq", 25.0, 4.0)):
        r = _res(label, 0.5, "http", tps, lat, 0.5)
        r["config"]["extra"].update(model="demo", quant="fp32", adapters=12)
        _write(cpu / "json", f"{label}.json", r)
    _write(cpu, "saturation_probe.json", {"summary": {"sent": 24, "throughput_rps": 1.17, "throughput_tps": 17.9}})
    (cpu / "command.txt").write_text("python3 benchmarks/serving_matrix.py --demo\n")
    md = tmp_path / "serving.md"
    assert write_page(res, md, ["# T", ""], cpu_http=cpu)
    text = md.read_text()
    assert "## HTTP on CPU (shared 2-core machine)" in text and "1.17 req/s" in text and "    python3 benchmarks/serving_matrix.py --demo" in text
    assert "| demo | fp32 | 12 | http | 0.5 | 1.50x | 1.50x | 1.50x | 1.00x |" in text  # vs fifo
    assert "| demo | fp32 | 12 | http | 0.5 | 1.20x | 2.00x | 2.00x | 1.00x |" in text  # vs mlfq
    assert write_page(res, md, ["# T", ""], cpu_http=tmp_path / "absent")
    assert "HTTP on CPU" not in md.read_text()


def test_run_directory_and_history_are_kept_apart(tmp_path) -> None:
    res = tmp_path / "res"
    new, old = res / "json_s4", res / "json"
    new.mkdir(parents=True)
    old.mkdir()
    _write(new, "a.json", _res("inlaid", 9.0, "engine", 300.0, 1.0, 1.0))
    _write(new, "b.json", _res("fifo", 9.0, "engine", 100.0, 3.0, 0.05))
    _write(old, "a.json", _res("inlaid", 7.0, "engine", 150.0, 1.0, 0.9))
    _write(old, "b.json", _res("fifo", 7.0, "engine", 100.0, 2.0, 0.4))
    md = tmp_path / "serving.md"
    assert write_page(res, md, ["# T", ""], run="json_s4", history=("json", "absent"))
    text = md.read_text()
    main, hist = text.split("## Earlier sessions (history)")
    assert "| m7 | w4 | 100 | engine | 9 | 3.00x | 3.00x | 3.00x | 20.00x |" in main and "| 7 |" not in main
    assert "20.00x met" in main and "SLO inlaid/fifo >= 10x in at least one configuration: **met**" in main
    assert "### History: `res/json/`" in hist and "| m7 | w4 | 100 | engine | 7 | 1.50x | 2.00x | 2.00x | 2.25x |" in hist
    assert "absent" not in hist
    # only history present: the page is still written (this run's tables say there is nothing)
    assert write_page(res, md, ["# T", ""], run="json_s5", history=("json",))
    assert "(no configuration with complete inlaid and fifo runs)" in md.read_text()
