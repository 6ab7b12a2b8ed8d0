"""Scheduler.schedule_ahead: the next decode step planned before the current step's tokens are applied."""

from __future__ import annotations

import random

from core_helpers import EOS, FakeClock, fake_result, make_req, make_sched
from inlaid.core.outputs import PENDING_TOKEN, SchedulerOutput
from inlaid.core.scheduler import Scheduler
from inlaid.request import RequestStatus


def _decoding(sched: Scheduler, *reqs) -> SchedulerOutput:
    """Admit ``reqs``, run their prefill step, return the next (decode) step's output, not yet updated."""
    for r in reqs:
        sched.add_request(r)
    out = sched.schedule()
    sched.update(out, fake_result(out))
    return sched.schedule()


def test_steady_decode_is_planned_one_token_ahead():
    sched = make_sched(block_size=4)
    a, b = make_req("a", prompt_len=3, max_tokens=10), make_req("b", prompt_len=4, max_tokens=10, adapter="x")
    prev = _decoding(sched, a, b)  # a: 3 prompt + 1 output, computing position 3; b: position 4
    ahead = sched.schedule_ahead(prev)
    assert ahead is not None and ahead.ahead and not ahead.adapter_loads and not ahead.preempted_ids
    assert [(s.request_id, s.token_ids, s.start_pos, s.sample, s.num_output_tokens) for s in ahead.scheduled] == [
        ("a", [PENDING_TOKEN], 4, True, 2), ("b", [PENDING_TOKEN], 5, True, 2)]
    assert [s.adapter_slot for s in ahead.scheduled] == [s.adapter_slot for s in prev.scheduled]
    # room for the ahead token: a needs 5 tokens (2 blocks of 4), b 6 (2 blocks)
    assert [len(s.block_ids) for s in ahead.scheduled] == [2, 2]
    assert not set(ahead.scheduled[0].block_ids) & set(ahead.scheduled[1].block_ids)
    sched.update(prev, fake_result(prev, token=5))
    sched.update(ahead, fake_result(ahead, token=6))
    assert a.output_token_ids == [7, 5, 6] and b.output_token_ids == [7, 5, 6]
    assert a.num_computed_tokens == 5 and b.num_computed_tokens == 6
    assert sched.schedule().scheduled[0].start_pos == 5  # the normal path takes over where the ahead one ended


def test_a_request_that_stops_at_the_previous_step_is_skipped_and_freed():
    sched = make_sched()
    a, b = make_req("a", max_tokens=10), make_req("b", max_tokens=10)
    prev = _decoding(sched, a, b)
    ahead = sched.schedule_ahead(prev)
    assert ahead is not None
    changed = sched.update(prev, fake_result(prev, per_req={"a": EOS, "b": 5}))
    assert a.status == RequestStatus.FINISHED_STOPPED and [r.request_id for r in changed] == ["a", "b"]
    assert sched.block_manager.block_table("a") == []  # freed at once; later steps run after the ahead one
    changed = sched.update(ahead, fake_result(ahead, token=6))
    assert [r.request_id for r in changed] == ["b"] and a.output_token_ids == [7, EOS]
    assert sched.schedule_ahead(ahead) is None  # the batch changed (a left): plan normally
    assert [s.request_id for s in sched.schedule().scheduled] == ["b"]


def test_not_steady_cases_return_none_and_change_nothing():
    # the previous step's token ends a request by length
    sched = make_sched()
    prev = _decoding(sched, make_req("a", max_tokens=2), make_req("b", max_tokens=10))
    free = sched.block_manager.num_free_blocks
    assert sched.schedule_ahead(prev) is None and sched.block_manager.num_free_blocks == free
    # ... or by the context limit
    sched = make_sched(max_model_len=6)
    assert sched.schedule_ahead(_decoding(sched, make_req("a", prompt_len=4, max_tokens=2))) is None
    # a waiting request could be admitted
    sched = make_sched()
    prev = _decoding(sched, make_req("a", max_tokens=10))
    sched.add_request(make_req("w", max_tokens=10))
    assert sched.schedule_ahead(prev) is None
    # a prefill chunk that does not reach the end of the prompt (nothing sampled)
    sched = make_sched(max_num_batched_tokens=4)
    sched.add_request(make_req("long", prompt_len=10, max_tokens=4))
    assert sched.schedule_ahead(sched.schedule()) is None
    # the KV cache has no block for the ahead token
    sched = make_sched(num_blocks=3, block_size=4)  # a and b each hold 1 block and would need a 2nd
    prev = _decoding(sched, make_req("a", prompt_len=3, max_tokens=3), make_req("b", prompt_len=3, max_tokens=3))
    assert sched.schedule_ahead(prev) is None and sched.block_manager.num_free_blocks == 1
    # prev already applied (update ran): its positions are stale
    sched = make_sched()
    prev = _decoding(sched, make_req("a", max_tokens=10))
    sched.update(prev, fake_result(prev))
    assert sched.schedule_ahead(prev) is None


def test_full_seats_do_not_block_the_ahead_step_unless_the_policy_preempts():
    for policy, expect in (("fifo", True), ("mlfq", False)):
        sched = make_sched(max_num_seqs=1, policy=policy)
        prev = _decoding(sched, make_req("a", max_tokens=10))
        sched.add_request(make_req("w", max_tokens=10))
        assert (sched.schedule_ahead(prev) is not None) is expect, policy


def test_prefill_completion_is_followed_by_an_ahead_decode():
    sched = make_sched(block_size=4)
    a = make_req("a", prompt_len=4, max_tokens=5)
    sched.add_request(a)
    prefill = sched.schedule()
    ahead = sched.schedule_ahead(prefill)
    assert ahead is not None and ahead.scheduled[0].start_pos == 4 and len(ahead.scheduled[0].block_ids) == 2


def _drive(seed: int, overlap: bool) -> tuple[dict[str, list[int]], int]:
    """Run a random workload to completion (tokens depend only on (request, position), as from a model);
    returns every request's tokens and the number of ahead steps."""
    rng = random.Random(seed)
    clock = FakeClock()
    sched = make_sched(clock, num_blocks=24, block_size=4, max_num_seqs=4, max_num_batched_tokens=12)
    reqs = [make_req(f"r{i}", prompt_len=rng.randint(1, 9), max_tokens=rng.randint(1, 12),
                     adapter=rng.choice([None, "x", "y"])) for i in range(10)]
    stop_at = {r.request_id: rng.randint(1, 14) for r in reqs}  # the output index that samples EOS

    def result(out: SchedulerOutput) -> dict[str, int]:
        toks = {}
        for s in out.scheduled:
            if s.sample:
                idx = s.num_output_tokens
                toks[s.request_id] = EOS if idx + 1 == stop_at[s.request_id] else 100 + idx
        return toks

    pending = list(reqs)
    inflight: SchedulerOutput | None = None
    n_ahead = 0
    for _ in range(500):
        if pending and rng.random() < 0.4:
            sched.add_request(pending.pop(0))
        out, inflight = (inflight, None) if inflight is not None else (sched.schedule(), None)
        if out.is_empty and not pending and not sched.has_unfinished_requests():
            break
        if overlap and not out.is_empty:
            inflight = sched.schedule_ahead(out)
            n_ahead += inflight is not None
        sched.update(out, fake_result(out, per_req=result(out)))
        clock.t += 1.0
    assert not sched.has_unfinished_requests()
    return {r.request_id: list(r.output_token_ids) for r in reqs}, n_ahead


def test_random_workloads_give_the_same_tokens_with_and_without_ahead_steps():
    total_ahead = 0
    for seed in range(20):
        tokens, n_ahead = _drive(seed, overlap=True)
        assert tokens == _drive(seed, overlap=False)[0], seed
        total_ahead += n_ahead
    assert total_ahead > 50  # the workloads do reach steady decode
