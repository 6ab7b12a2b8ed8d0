import math
import random

import pytest

from inlaid.bench.metrics import RequestRecord, job_completion_times, percentile, summarize
from inlaid.bench.workload import WorkloadConfig, generate_workload, popularity_weights
from inlaid.config import SchedulerConfig
from inlaid.core.outputs import ScheduledSeq, SchedulerOutput
from inlaid.sampling import SamplingParams
from inlaid.sim.cost_model import StepCostModel, fit_cost_model
from inlaid.sim.simulator import EngineShape, RequestSpec, simulate
from inlaid.sim.study import run_policy

SHAPE = EngineShape(num_blocks=256, block_size=16, num_adapter_slots=8, max_model_len=2048)


def _cfg(policy="fifo", **kw):
    return SchedulerConfig(policy=policy, max_num_seqs=16, max_num_batched_tokens=512, max_queue_len=100_000, **kw)


def test_fit_cost_model_recovers_coefficients():
    true = StepCostModel(base=0.01, prefill_token=2e-4, decode_seq=3e-4, distinct_adapter=1e-3, adapter_load=5e-3)
    rng = random.Random(0)
    samples = []
    for _ in range(60):
        x = [1.0, float(rng.randint(0, 2000)), float(rng.randint(0, 64)), float(rng.randint(0, 10)),
             float(rng.randint(0, 3))]
        samples.append((x, true.cost(x) * (1 + rng.uniform(-0.01, 0.01))))
    fit = fit_cost_model(samples)
    for name in ("base", "prefill_token", "decode_seq", "distinct_adapter", "adapter_load"):
        assert getattr(fit, name) == pytest.approx(getattr(true, name), rel=0.1), name
    with pytest.raises(ValueError, match="singular"):
        fit_cost_model([([1.0, float(i), 0.0, 0.0, 0.0], 0.01 * i) for i in range(10)])
    with pytest.raises(ValueError, match="at least"):
        fit_cost_model(samples[:3])


def test_cost_features_of_a_step():
    sp = SamplingParams()
    out = SchedulerOutput(
        scheduled=[ScheduledSeq("a", [1] * 10, 0, [0], 0, True, sp), ScheduledSeq("b", [1], 9, [1], 0, True, sp),
                   ScheduledSeq("c", [1], 5, [2], 1, True, sp), ScheduledSeq("d", [1], 5, [3], -1, True, sp)],
        adapter_loads={1: "y"})
    assert StepCostModel.features(out) == [1.0, 10.0, 3.0, 2.0, 1.0]


def test_simulator_serves_true_lengths_without_revealing_them():
    specs = [RequestSpec(f"r{i}", 0.1 * i, f"t{i % 3}", 20 + i, 5 + i, 64) for i in range(30)]
    res = simulate(specs, _cfg("inlaid"), SHAPE)
    assert len(res.requests) == 30 and not res.rejected
    for r in res.requests:
        assert r.num_output_tokens == res.specs[r.request_id].output_len
        assert r.finished_time >= r.first_token_time >= r.arrival_time
    assert res.makespan == pytest.approx(max(r.finished_time for r in res.requests))
    assert res.makespan >= sum(res.step_times) - 1e-9  # idle gaps only add time


def test_workload_is_deterministic_and_shaped():
    cfg = WorkloadConfig(num_requests=3000, rate=5.0, cv=2.0, num_tasks=10, popularity="zipf", seed=3)
    a, b = generate_workload(cfg), generate_workload(cfg)
    assert a == b and len(a) == 3000
    gaps = [y.arrival - x.arrival for x, y in zip(a, a[1:])]
    mean = sum(gaps) / len(gaps)
    sd = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps))
    assert mean == pytest.approx(1 / 5.0, rel=0.15) and sd / mean == pytest.approx(2.0, rel=0.2)
    counts = {}
    for s in a:
        counts[s.adapter] = counts.get(s.adapter, 0) + 1
    assert counts["t0"] > 2.5 * counts["t9"]
    assert popularity_weights(WorkloadConfig(num_tasks=4, popularity="uniform")) == [0.25] * 4
    jobs = generate_workload(WorkloadConfig(num_requests=40, job_size=8, seed=1))
    assert len({s.job_id for s in jobs}) == 5 and all(len({s.adapter for s in jobs if s.job_id == j}) == 1
                                                      for j in {s.job_id for s in jobs})
    with pytest.raises(ValueError, match="popularity"):
        WorkloadConfig(popularity="pareto")


def test_metrics_definitions():
    recs = [RequestRecord(0.0, 1.0, 3.0, 3, "j", 1.0), RequestRecord(1.0, 2.0, 6.0, 5, "j", 1.0),
            RequestRecord(2.0, 2.5, 2.5, 1, None, 1.0)]
    m = summarize(recs, num_submitted=4, slo_scale=3.0)
    assert m["latency_mean"] == pytest.approx((3 + 5 + 0.5) / 3)
    assert m["ttft_mean"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["tpot_mean"] == pytest.approx((1.0 + 1.0) / 2)
    assert sorted(job_completion_times(recs)) == [0.5, 6.0]
    assert m["slo_attainment"] == pytest.approx(2 / 4)  # 5 s > 3 x 1 s misses; the unsubmitted one misses
    assert m["throughput_rps"] == pytest.approx(3 / 6.0)
    assert percentile([1, 2, 3, 4], 50) == 2.5


def test_inlaid_beats_fifo_on_latency_under_load():
    """Length-guided SRTF must cut mean latency when the queue builds (a small saturated run)."""
    specs = generate_workload(WorkloadConfig(num_requests=300, rate=40.0, num_tasks=10, seed=0,
                                             output_range=(4.0, 128.0), prompt_range=(8.0, 64.0),
                                             lengths="synthetic"))
    fifo = run_policy(specs, _cfg("fifo", aging_s=1e6), SHAPE)
    inl = run_policy(specs, _cfg("inlaid", aging_s=1e6), SHAPE)
    assert inl["finished"] == fifo["finished"] == 300
    assert inl["latency_mean"] < 0.8 * fifo["latency_mean"]
