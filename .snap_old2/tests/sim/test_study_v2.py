"""Throughput bound, MLFQ no longer equal to FIFO under overload, per-policy starvation setting."""

from inlaid.sim.cost_model import StepCostModel
from inlaid.sim.simulator import EngineShape
from inlaid.sim.study import StudySetup, sweep, throughput_bound, workload

SETUP = StudySetup(shape=EngineShape(num_blocks=128, num_adapter_slots=4, max_model_len=2048), max_num_seqs=16,
                   max_num_batched_tokens=512, lengths="synthetic",
                   cost=StepCostModel(base=0.03, prefill_token=5e-4, decode_seq=0.0, distinct_adapter=0.0,
                                      adapter_load=0.036))


def test_no_policy_beats_the_throughput_bound_and_mlfq_differs_from_fifo_under_overload():
    rows = sweep(SETUP, 120, [1000.0], [6])
    by = {r["policy"]: r for r in rows}
    assert all(r["finished"] == 120 for r in rows)  # everyone finishes, incl. mlfq with preemptions
    for r in rows:
        assert r["throughput_rps"] <= r["throughput_bound"] * (1 + 1e-9)
    assert by["mlfq"]["preemptions"] > by["fifo"]["preemptions"]  # priority preemption on top of KV
    assert by["mlfq"]["latency_mean"] != by["fifo"]["latency_mean"]


def test_throughput_bound_by_hand():
    specs = workload(10, 1e6, 2, SETUP)
    p = sum(s.prompt_len for s in specs)
    o = sum(s.output_len for s in specs)
    d = len({s.adapter for s in specs})
    steps = max(-(-o // 16), -(-(p + o) // 512))
    want = 10 / (p * 5e-4 + d * 0.036 + steps * 0.03)
    assert abs(throughput_bound(specs, SETUP) - want) < 1e-9


def test_mlfq_starvation_setting_applies_to_mlfq_only():
    s = StudySetup(mlfq_starvation_s=99.0)
    assert s.sched_cfg("mlfq").aging_s == 99.0 and s.sched_cfg("inlaid").aging_s == 10.0
