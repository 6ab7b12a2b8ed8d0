"""The real engine replays a trace on a virtual clock with the trace's output lengths (tiny model, CPU)."""

import pytest

from inlaid.bench.engine_driver import build_bench_engine, offline_throughput, replay
from inlaid.config import SchedulerConfig
from inlaid.sampling import SamplingParams
from inlaid.sim.simulator import RequestSpec


def test_replay_serves_trace_lengths_under_each_policy(tiny_llama_dir):
    eng = build_bench_engine(str(tiny_llama_dir), "cpu", slots=2, num_adapters=3, rank=4, num_blocks=64)
    specs = [RequestSpec(f"r{i}", 0.01 * i, f"t{i % 3}" if i % 4 else None, 3 + i, 1 + (i * 3) % 7, 16, f"j{i // 2}")
             for i in range(8)]
    specs.append(RequestSpec("late", 1e6, "t0", 4, 2, 16))  # idle gap: the clock jumps to its arrival
    vocab = eng.parts.arch.vocab_size
    for policy in ("fifo", "mlfq", "inlaid"):
        res = replay(eng, specs, SchedulerConfig(policy=policy, max_num_seqs=3, max_queue_len=100), vocab=vocab)
        assert set(res.records) == {s.request_id for s in specs}
        for s in specs:
            rec = res.records[s.request_id]
            assert rec.output_len == s.output_len  # oracle EOS ends it at the trace length
            assert rec.arrival == s.arrival <= rec.first_token <= rec.finish <= res.makespan
        assert res.records["late"].first_token > 1e6
        assert res.stats.finished == len(specs) and res.stats.adapter_loads >= 3  # 3 adapters, 2 slots
        assert len(res.step_times) == res.stats.steps
        assert eng.scheduler.policy.name == policy
    assert not eng.has_unfinished_requests()


def test_offline_throughput_counts_tokens(tiny_llama_dir):
    eng = build_bench_engine(str(tiny_llama_dir), "cpu", slots=1, num_adapters=1, rank=4, num_blocks=32)
    res = offline_throughput(eng, [[5, 6, 7]] * 3, SamplingParams(max_tokens=4, ignore_eos=True), ["t0", None, "t0"])
    assert res["requests"] == 3 and res["output_tokens"] == 12 and res["output_tokens_per_s"] > 0
    try:
        offline_throughput(eng, [[5]], SamplingParams(max_tokens=2), ["t0", None])
    except ValueError as exc:
        assert "one adapter per prompt" in str(exc)
    else:
        raise AssertionError("mismatched adapters must raise ValueError")


def test_model_clock_replay_matches_the_simulator_exactly(tiny_llama_dir):
    """With the clock driven by the cost model, the engine and the simulator make the same decisions."""
    from inlaid.sim.cost_model import StepCostModel
    from inlaid.sim.simulator import EngineShape, simulate

    eng = build_bench_engine(str(tiny_llama_dir), "cpu", slots=2, num_adapters=3, rank=4, num_blocks=24)
    cost = StepCostModel(base=0.05, prefill_token=0.001, decode_seq=0.01, distinct_adapter=0.02, adapter_load=0.03)
    specs = [RequestSpec(f"r{i}", 0.04 * i, f"t{i % 3}", 2 + i % 5, 1 + (i * 5) % 9, 12) for i in range(14)]
    sched = SchedulerConfig(policy="inlaid", max_num_seqs=4, max_num_batched_tokens=16, max_adapters_per_step=2,
                            max_queue_len=100)
    res = replay(eng, specs, sched, vocab=eng.parts.arch.vocab_size, step_cost=cost.cost)
    sim = simulate(specs, sched, EngineShape(num_blocks=24, block_size=16, num_adapter_slots=2, max_model_len=256),
                   cost)
    assert res.stats.steps == sim.stats.steps and res.stats.adapter_loads == sim.stats.adapter_loads
    for r in sim.requests:
        e = res.records[r.request_id]
        assert (e.first_token, e.finish) == pytest.approx((r.first_token_time, r.finished_time), abs=1e-9)
