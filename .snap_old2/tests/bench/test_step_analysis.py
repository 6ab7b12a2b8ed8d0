"""Step-log summaries, the targets table and the simulator-vs-measurement table of the serving page
(pure Python, hand-made inputs with known answers)."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import pytest

from inlaid.bench.page_targets import capacity_lines, target_rows, targets_section
from inlaid.bench.sim_predict import (
    prediction_rows,
    prediction_table,
    rate_choice,
    simulate_specs,
)
from inlaid.bench.step_log import COLUMNS, step_analysis, step_fields, summarize_steps
from inlaid.bench.workload import WorkloadConfig, generate_workload
from inlaid.core.outputs import ScheduledSeq, SchedulerOutput
from inlaid.sampling import SamplingParams
from inlaid.sim.cost_model import StepCostModel
from inlaid.sim.simulator import EngineShape


def _row(step_s: float, exec_s: float, pre: int, dec: int, tokens: int, distinct: int, loads: int = 0,
         preempt: int = 0) -> list[float]:
    return [0.0, step_s, exec_s, (step_s - exec_s) / 2, pre, dec, tokens, distinct, loads, preempt, 0, 0]


def test_step_fields_of_a_scheduler_output() -> None:
    sp = SamplingParams(max_tokens=4)
    out = SchedulerOutput([ScheduledSeq("a", [1, 2, 3], 0, [0], 0, True, sp),  # prefill, slot 0
                           ScheduledSeq("b", [4], 7, [1], 0, True, sp),  # decode, slot 0
                           ScheduledSeq("c", [5], 9, [2], -1, True, sp),  # decode, base model
                           ScheduledSeq("d", [6, 7], 0, [3], 2, True, sp)],  # prefill, slot 2
                          adapter_loads={2: "t2"})
    assert step_fields(out) == [2, 2, 5, 2, 1]
    assert step_fields(None) == [0, 0, 0, 0, 0]


def test_summarize_steps_means_and_slow_steps() -> None:
    rows = [_row(0.10, 0.09, 4, 0, 400, 3, loads=3), _row(0.02, 0.015, 0, 4, 0, 3), _row(0.02, 0.015, 0, 4, 0, 3),
            _row(0.20, 0.19, 0, 2, 0, 1, preempt=1),  # a decode step 10x its kind's median: slow
            _row(0.001, 0.0, 0, 0, 0, 0)]  # an empty step: counted in steps and total, not in the means
    s = summarize_steps({"columns": list(COLUMNS), "rows": rows})
    assert s["steps"] == 5 and s["prefill_steps"] == 1 and s["decode_only_steps"] == 3
    assert s["mean_decode_batch"] == pytest.approx(10 / 4) and s["mean_prefill_seqs"] == 4
    assert s["mean_prefill_tokens"] == 400 and s["mean_distinct_adapters"] == pytest.approx(10 / 4)
    assert s["adapter_loads"] == 3 and s["preemptions"] == 1 and s["slow_steps"] == 1
    assert s["mean_prefill_step_s"] == pytest.approx(0.10) and s["mean_decode_step_s"] == pytest.approx(0.08)
    assert s["mean_host_s"] == pytest.approx((0.01 + 0.005 + 0.005 + 0.01) / 4)
    assert s["mean_sched_s"] == pytest.approx(s["mean_host_s"] / 2)
    assert s["total_s"] == pytest.approx(0.341)
    assert s["decode_step_cv"] == pytest.approx(statistics.pstdev([0.02, 0.02, 0.2]) / 0.08)
    old = summarize_steps({"columns": [c for c in COLUMNS if c != "sched_s"], "rows": [r[:3] + r[4:] for r in rows]})
    assert old["mean_sched_s"] is None and old["mean_host_s"] == s["mean_host_s"]  # a log from before sched_s
    with pytest.raises(ValueError, match="step log lacks columns"):
        summarize_steps({"columns": ["t_end"], "rows": []})


def _res(label: str, rate: float, tps: float, lat: float, slo: float, *, n: int = 100, log: bool = False,
         complete: bool = True) -> dict:
    r = {"config": {"label": label, "rate": rate, "complete": complete,
                    "extra": {"model": "m7", "quant": "w4", "adapters": n, "driver": "engine"}},
         "summary": {"throughput_tps": tps, "latency_mean": lat, "jct_mean": 2 * lat, "slo_attainment": slo}}
    if log:
        r["step_log"] = {"columns": list(COLUMNS), "rows": [_row(0.1, 0.09, 2, 0, 50, 2), _row(0.02, 0.01, 0, 2, 0, 1)]}
    return r


def _points(results: list[dict]) -> dict[tuple, dict[str, dict]]:
    out: dict[tuple, dict[str, dict]] = {}
    for r in results:
        ex = r["config"]["extra"]
        out.setdefault((ex["model"], ex["quant"], ex["adapters"], ex["driver"], r["config"]["rate"]), {})[
            r["config"]["label"]] = r
    return out


def test_targets_at_the_highest_complete_rate_per_configuration(tmp_path: Path) -> None:
    pts = _points([
        _res("inlaid", 8.0, 200.0, 1.0, 0.9), _res("fifo", 8.0, 100.0, 2.0, 0.06), _res("mlfq", 8.0, 120.0, 1.5, 0.1),
        _res("inlaid", 4.0, 120.0, 0.5, 1.0), _res("fifo", 4.0, 110.0, 0.6, 1.0), _res("mlfq", 4.0, 130.0, 0.55, 1.0),
        _res("inlaid", 9.0, 1.0, 1.0, 1.0, n=10), _res("fifo", 9.0, 1.0, 1.0, 1.0, n=10, complete=False),
        _res("inlaid", 3.0, 100.0, 1.0, 0.5, n=10), _res("fifo", 3.0, 50.0, 1.0, 0.0, n=10)])
    rows = {r["config"][2]: r for r in target_rows(pts)}
    top = rows[100]
    assert top["rate"] == 8.0 and top["ratios"]["throughput_tps"] == pytest.approx(2.0)
    assert top["ratios"]["latency_mean"] == pytest.approx(2.0) and top["ratios"]["slo_attainment"] == pytest.approx(15.0)
    assert top["beats_mlfq"] is False  # at 4 req/s mlfq has the higher throughput
    assert rows[10]["rate"] == 3.0  # the 9 req/s fifo run was cut by its wall cap: not comparable
    assert rows[10]["ratios"]["slo_attainment"] is None and rows[10]["beats_mlfq"] is None  # fifo attains 0
    cap = tmp_path / "capacity.json"
    cap.write_text(json.dumps({"rows": [{"model": "m13", "quant": "w4", "budget_gb": 40, "max_adapters": 298},
                                        {"model": "m13", "quant": "fp16", "budget_gb": 40, "max_adapters": 119,
                                         "verified": 90}]}))
    text = "\n".join(targets_section(pts, cap))
    assert "| m7 | w4 | 100 | engine | 8 | 2.00x met | 2.00x met | 2.00x met | 15.00x met | 0.06 / 0.90 | NOT met |" in text
    assert "SLO inlaid/fifo >= 10x in at least one configuration: **met** (m7 w4 100a engine)" in text
    assert "throughput inlaid/fifo >= 1.58x in at least one configuration: **met**" in text
    assert "better than mlfq everywhere (all four metrics, every rate): **NOT met** (0/1 configurations)" in text
    assert capacity_lines(cap) == ["- W4 >= 3x fp16 adapters, m13 at 40 GB: 298 vs 119 = 2.50x (accounting only): "
                                   "**NOT met**"]
    assert "not measured" in capacity_lines(tmp_path / "absent.json")[0]


def test_step_analysis_rows_per_policy_and_warmup() -> None:
    pts = _points([_res("inlaid", 8.0, 200.0, 1.0, 0.9, log=True), _res("fifo", 8.0, 100.0, 2.0, 0.1, log=True),
                   _res("fifo", 4.0, 100.0, 2.0, 0.1)])  # no step log (session-3 style): no section
    warm = _points([_res("inlaid", 8.0, 150.0, 1.0, 0.9, log=True)])
    text = "\n".join(step_analysis(pts, {"warm-up": warm, "repeat": warm}))
    assert "**m7, w4, 100 adapters, engine, 8 req/s**" in text and "4 req/s" not in text
    lines = [ln for ln in text.splitlines() if ln.startswith(("| inlaid", "| fifo"))]
    assert [ln.split(" | ")[0] for ln in lines] == ["| inlaid", "| inlaid (repeat)", "| inlaid (warm-up)", "| fifo"]
    assert lines[0].startswith("| inlaid | 2 | 1 | 2 | 1 | 1.5 | 0 | 0 | 100 | 20 | - | 10 | 5 | 0.12 | 0 |")
    assert "no run with a step log" in "\n".join(step_analysis(_points([_res("fifo", 1.0, 1.0, 1.0, 1.0)])))


def _sweep_json(path: Path, variant: str, wl: WorkloadConfig, cost: StepCostModel, shape: EngineShape,
                scale: float) -> None:
    """A fake engine run: the simulator's own timeline of ``variant``, with times multiplied by ``scale``."""
    from inlaid.sim.serving_replay import run_variant

    specs = generate_workload(wl)
    res = run_variant(specs, variant, shape, cost)
    recs = [{"request_id": r.request_id, "task": res.specs[r.request_id].adapter, "prompt_len": len(r.prompt_token_ids),
             "arrival": r.arrival_time, "first_token": scale * r.first_token_time, "finish": scale * r.finished_time,
             "output_len": r.num_output_tokens, "job_id": res.specs[r.request_id].job_id, "isolated": None}
            for r in res.requests]
    summ = simulate_specs(specs, variant, cost, shape, None)
    summ = {**summ, "throughput_tps": summ["throughput_tps"] / scale, "latency_mean": summ["latency_mean"] * scale}
    path.write_text(json.dumps({"config": {"label": variant, "rate": wl.rate, "slo_scale": 5.0, "complete": True,
                                           "workload": dataclasses.asdict(wl),
                                           "extra": {"model": "m", "quant": "w4", "adapters": wl.num_tasks,
                                                     "driver": "engine"}},
                                "isolated": {"ttft_a": 0.2, "ttft_b": 0.0, "tpot": 0.02, "probes": 4},
                                "summary": summ, "records": recs}))


def test_simulator_prediction_of_recorded_runs(tmp_path: Path) -> None:
    cost = StepCostModel(base=0.016, prefill_token=0.0, decode_seq=0.0004, distinct_adapter=0.0, adapter_load=0.0,
                         prefill_step=0.1)
    shape = EngineShape(num_blocks=4096, num_adapter_slots=8)
    wl = WorkloadConfig(num_requests=60, rate=40.0, num_tasks=10, job_size=2, lengths="synthetic", max_tokens=32,
                        max_prompt=64, output_range=(4.0, 16.0), prompt_range=(16.0, 48.0))
    points: dict[tuple, dict] = {}
    for v, scale in (("inlaid", 1.0), ("fifo", 1.0), ("mlfq", 2.0)):  # mlfq "measured" 2x slower than simulated
        p = tmp_path / f"m_w4_10a_engine_{v}_r40.json"
        _sweep_json(p, v, wl, cost, shape, scale)
        points.setdefault(("m", "w4", 10, "engine", 40.0), {})[v] = (p, json.loads(p.read_text()))
    rows = prediction_rows(points, cost, shape)
    assert len(rows) == 1
    r = rows[0]["ratios"]
    # fifo and inlaid are the simulator's own timelines: the inlaid/fifo throughput ratio is predicted exactly
    assert r["throughput_tps/fifo"]["rel_error"] == pytest.approx(0.0, abs=1e-9)
    assert r["latency_mean/fifo"]["rel_error"] == pytest.approx(0.0, abs=1e-9)
    assert r["throughput_tps/mlfq"]["simulated"] == pytest.approx(r["throughput_tps/mlfq"]["measured"] / 2)
    text = "\n".join(prediction_table(rows, "gpu.json"))
    assert "| m | w4 | 10 | 40 | throughput_tps |" in text and "Ranking agreement over" in text
    # the rate choice: every variant at each multiple, one trace per multiple
    choice = rate_choice(cost, dataclasses.replace(wl, num_requests=40), 20.0, [1.0, 2.0], None, shape)
    assert [(c["rate"], c["variant"]) for c in choice][:3] == [(20.0, "fifo"), (20.0, "inlaid"), (20.0, "mlfq")]
    assert all(0.0 <= c["slo_attainment"] <= 1.0 for c in choice)


def test_step_time_jitter_study_is_seeded_and_zero_jitter_is_the_plain_model() -> None:
    from inlaid.bench.sim_predict import NoisyCost, noise_spread

    cost = StepCostModel(base=0.016, prefill_token=0.0, decode_seq=0.0004, distinct_adapter=0.0, adapter_load=0.0,
                         prefill_step=0.1)
    shape = EngineShape(num_blocks=4096, num_adapter_slots=8)
    specs = generate_workload(WorkloadConfig(num_requests=40, rate=60.0, num_tasks=8, job_size=2, lengths="synthetic",
                                             max_tokens=16, max_prompt=48, output_range=(4.0, 12.0)))
    plain = simulate_specs(specs, "inlaid", cost, shape, None)
    none = noise_spread(specs, ["inlaid"], cost, shape, None, 0.0, [0, 1])["inlaid"]
    assert none[0]["throughput_tps"] == none[1]["throughput_tps"] == pytest.approx(plain["throughput_tps"])
    a = noise_spread(specs, ["inlaid", "fifo"], cost, shape, None, 0.3, [0, 1, 2])
    b = noise_spread(specs, ["inlaid", "fifo"], cost, shape, None, 0.3, [0, 1, 2])
    assert a == b  # seeded
    assert len({m["latency_mean"] for m in a["fifo"]}) > 1  # the draws differ
    factors = NoisyCost(cost, 0.2, 3)
    xs = [factors.rng.lognormvariate(factors.mu, factors.sigma) for _ in range(20000)]
    assert statistics.fmean(xs) == pytest.approx(1.0, abs=0.01)  # mean-1 jitter of the given cv
    assert statistics.pstdev(xs) == pytest.approx(0.2, abs=0.01)
