import pytest

from inlaid.sim.cost_model import StepCostModel
from inlaid.sim.simulator import EngineShape
from inlaid.sim.study import StudySetup, markdown_table, ratios, saturation_rate, sweep

SETUP = StudySetup(shape=EngineShape(num_blocks=128, num_adapter_slots=4, max_model_len=2048), max_num_seqs=16,
                   max_num_batched_tokens=512, lengths="synthetic")


def test_sweep_rows_share_a_trace_and_table_renders():
    rows = sweep(SETUP, 60, [0.5, 50.0], [3])
    assert [(r["rate"], r["policy"]) for r in rows] == [(a, p) for a in (0.5, 50.0) for p in ("fifo", "mlfq", "inlaid")]
    assert all(r["finished"] == 60 for r in rows)
    light = [r for r in rows if r["rate"] == 0.5]
    # at light load nobody queues, so every policy serves the same trace the same way
    assert len({round(r["latency_mean"], 9) for r in light}) == 1
    table = markdown_table(rows, ["tasks", "rate", "policy"], ("throughput_rps", "missing"))
    assert table.splitlines()[0] == "| tasks | rate | policy | throughput_rps | missing |"
    assert len(table.splitlines()) == 2 + len(rows) and "| - |" in table
    r = ratios(rows, 50.0)
    assert [x["vs"] for x in r] == ["fifo", "mlfq"] and all(x["throughput_x"] > 0 for x in r)


def test_saturation_rate_scales_with_the_cost_model():
    fast = saturation_rate(SETUP, 3, n=80)
    slow_setup = StudySetup(**{**SETUP.__dict__, "cost": StepCostModel(base=0.024, prefill_token=2.4e-4,
                                                                      decode_seq=5e-4, distinct_adapter=1.6e-3,
                                                                      adapter_load=0.012)})
    slow = saturation_rate(slow_setup, 3, n=80)
    assert slow == pytest.approx(fast / 2, rel=0.05)  # every coefficient doubled -> half the throughput


def test_slo_ratio_is_honest_when_the_baseline_attains_nothing():
    import math

    from inlaid.sim.study import fmt_ratio, slo_ratio

    assert slo_ratio(0.5, 0.25) == 2.0
    assert math.isinf(slo_ratio(0.3, 0.0)) and math.isnan(slo_ratio(0.0, 0.0))
    assert fmt_ratio(slo_ratio(0.3, 0.0)) == "inf (baseline 0 attained)"
    assert fmt_ratio(slo_ratio(0.0, 0.0)) == "n/a (both 0 attained)"
    assert fmt_ratio(2.0) == "2.00x"
    rows = [{"tasks": 1, "rate": 1.0, "policy": p, "throughput_rps": 1.0, "latency_mean": 1.0, "jct_mean": 1.0,
             "slo_attainment": a} for p, a in (("fifo", 0.0), ("mlfq", 0.0), ("inlaid", 0.4))]
    r = ratios(rows, 1.0)
    assert all(math.isinf(x["slo_x"]) and x["slo_base"] == 0.0 for x in r)
    assert "| inf |" in markdown_table(r, ["vs"], ("slo_x",)) and "e+08" not in markdown_table(r, ["vs"], ("slo_x",))
