"""Policy-aware slot eviction, MLFQ priority preemption/demotion, starvation slot reservation, adaptive aging."""

import pytest

from core_helpers import FakeClock, check_output, fake_result, make_req, make_sched, run_to_completion
from inlaid.core.adapter_slots import AdapterSlots
from inlaid.core.inlaid_policy import InlaidPolicy
from inlaid.core.mlfq import MlfqPolicy
from inlaid.core.scheduler import Scheduler
from inlaid.config import SchedulerConfig
from inlaid.request import RequestStatus


def test_slots_choose_victim_among_unpinned_in_lru_order():
    s = AdapterSlots(3)
    for a in ("a", "b", "c"):
        s.acquire(a)
    s.release("a")
    s.release("c")  # b stays pinned
    seen = []
    slot, loaded = s.acquire("d", lambda cands: seen.append(list(cands)) or "c")
    assert seen == [["a", "c"]] and loaded and s.slot_of("c") is None and s.slot_of("a") is not None
    assert slot == 2
    s.release("d")
    with pytest.raises(ValueError, match="not an unpinned"):
        s.acquire("e", lambda cands: "b")  # b is pinned
    assert s.acquire("f")[1] and s.slot_of("a") is None  # default: LRU


def _inlaid(**kw):
    pol = InlaidPolicy(**kw)
    pol.attach(AdapterSlots(4), {}, [])
    return pol


def test_inlaid_evicts_adapter_without_waiting_work_then_lowest_demand():
    pol = _inlaid()
    for i, a in enumerate(["a", "a", "a", "b", "c"]):
        pol.on_add(make_req(f"r{i}", adapter=a), 0.0)
    pol.order_waiting([make_req("w", adapter="b")], 0.0)  # only b has waiting work
    assert pol.pick_slot_victim(["b", "a"]) == "a"  # b is least recently used but has work waiting
    assert pol.pick_slot_victim(["a", "c"]) == "c"  # neither waits: c had fewer recent arrivals
    lru = _inlaid(use_policy_eviction=False)
    lru.order_waiting([make_req("w", adapter="b")], 0.0)
    assert lru.pick_slot_victim(["b", "a"]) == "b"


def test_fifo_slot_eviction_stays_lru():
    sched = make_sched(policy="fifo", slots=2, max_num_seqs=1)
    for rid, a in (("1", "a"), ("2", "b"), ("3", "a"), ("4", "c")):
        sched.add_request(make_req(rid, adapter=a, max_tokens=1))
        run_to_completion(sched)
    assert set(sched.resident_adapters()) == {"a", "c"}  # b was least recently used


def _mlfq_sched(clock, priority_preemption=True, max_num_seqs=1, **guards):
    """Unguarded (FastServe's iteration-level) preemption unless ``guards`` are given."""
    cfg = SchedulerConfig(policy="mlfq", max_num_seqs=max_num_seqs, aging_s=1000.0)
    guards = guards or {"preempt_level_gap": 1, "min_run_tokens": 0}
    pol = MlfqPolicy(base_quantum=2, starvation_s=1000.0, priority_preemption=priority_preemption, **guards)
    return Scheduler(cfg, num_blocks=64, block_size=4, num_adapter_slots=2, max_model_len=256, clock=clock,
                     policy=pol), pol


def _step(sched, clock):
    out = sched.schedule()
    check_output(sched, out)
    sched.update(out, fake_result(out))
    clock.t += 1.0
    return out


def test_mlfq_demotes_after_quantum_with_doubling():
    clock = FakeClock()
    sched, pol = _mlfq_sched(clock)
    sched.add_request(make_req("long", max_tokens=20))
    levels = []
    for _ in range(8):
        _step(sched, clock)
        levels.append(pol.level["long"])
    # quantum 2 at level 0, 4 at level 1, 8 at level 2 (one output token per step)
    assert levels == [0, 1, 1, 1, 1, 2, 2, 2]


def test_mlfq_high_priority_arrival_preempts_by_recompute_and_everyone_finishes():
    clock = FakeClock()
    sched, pol = _mlfq_sched(clock)
    long = make_req("long", max_tokens=12)
    sched.add_request(long)
    for _ in range(4):
        _step(sched, clock)
    assert pol.level["long"] == 1 and long.num_output_tokens == 4
    sched.add_request(make_req("new", max_tokens=2, arrival=clock.t))
    out = _step(sched, clock)
    assert out.preempted_ids == ["long"] and [s.request_id for s in out.scheduled] == ["new"]
    assert long.status == RequestStatus.WAITING and long.num_output_tokens == 4
    run_to_completion(sched)
    assert long.is_finished and long.num_output_tokens == 12 and sched.stats.preemptions == 1
    assert long.output_token_ids == [7] * 12  # the preempted request's tokens are kept, not re-sampled


def _preempted_at(sched, clock, steps):
    return [bool(_step(sched, clock).preempted_ids) for _ in range(steps)]


def test_mlfq_default_guards_need_two_levels_and_a_used_quantum():
    # quanta 2, 4, 8: "long" is level 1 after 2 tokens, level 2 after 6, level 3 after 14
    clock = FakeClock()
    sched, pol = _mlfq_sched(clock, preempt_level_gap=2, min_run_tokens=None)
    long = make_req("long", max_tokens=30)
    sched.add_request(long)
    for _ in range(4):
        _step(sched, clock)
    sched.add_request(make_req("new", max_tokens=2, arrival=clock.t))
    # level 1 vs 0 is one level apart: no preemption; at level 2 (6 tokens) it must first use its
    # level-2 quantum (8 tokens since admission): preempted by the schedule after its 8th token
    assert _preempted_at(sched, clock, 5) == [False, False, False, False, True]
    assert long.num_output_tokens == 8 and long.status == RequestStatus.WAITING
    run_to_completion(sched)
    assert long.num_output_tokens == 30 and sched.stats.preemptions == 1


def test_mlfq_min_run_tokens_protects_a_readmitted_request():
    clock = FakeClock()
    sched, pol = _mlfq_sched(clock, preempt_level_gap=1, min_run_tokens=3)
    long = make_req("long", max_tokens=30)
    sched.add_request(long)
    assert _preempted_at(sched, clock, 3) == [False] * 3
    sched.add_request(make_req("n1", max_tokens=1, arrival=clock.t))
    assert _preempted_at(sched, clock, 1) == [True]  # level 1 with 3 tokens since admission
    assert _preempted_at(sched, clock, 1) == [False]  # n1 finished; long readmitted (recompute + 1 token)
    assert long.status == RequestStatus.RUNNING and long.num_output_tokens == 4
    sched.add_request(make_req("n2", max_tokens=1, arrival=clock.t))
    assert _preempted_at(sched, clock, 3) == [False, False, True]  # 1 and 2 tokens since readmission: protected
    assert long.num_output_tokens == 6 and sched.stats.preemptions == 2
    run_to_completion(sched)
    assert long.num_output_tokens == 30
    with pytest.raises(ValueError, match="preempt_level_gap"):
        MlfqPolicy(preempt_level_gap=0)


def test_mlfq_no_preemption_between_equal_levels_or_when_switched_off():
    for prio, want in ((True, 0), (False, 0)):
        clock = FakeClock()
        sched, _ = _mlfq_sched(clock, priority_preemption=prio)
        sched.add_request(make_req("a", max_tokens=2))
        _step(sched, clock)  # a has 1 token: still level 0
        sched.add_request(make_req("b", max_tokens=2, arrival=clock.t))
        _step(sched, clock)
        assert sched.stats.preemptions == want
    clock = FakeClock()
    sched, _ = _mlfq_sched(clock, priority_preemption=False)
    sched.add_request(make_req("a", max_tokens=10))
    for _ in range(4):
        _step(sched, clock)
    sched.add_request(make_req("b", max_tokens=2, arrival=clock.t))
    run_to_completion(sched)
    assert sched.stats.preemptions == 0


def test_mlfq_starvation_is_measured_since_last_run():
    clock = FakeClock()
    pol = MlfqPolicy(starvation_s=5.0)
    r = make_req("r", arrival=0.0)
    pol.on_add(r, 0.0)
    pol.level["r"] = 3
    pol.on_step([r], 4.0)  # it ran at t=4
    pol.order_waiting([r], 8.0)
    assert pol.level["r"] == 3  # waited 4 s since it last ran
    pol.order_waiting([r], 9.5)
    assert pol.level["r"] == 0 and pol.promotions == 1


def test_starving_request_reserves_next_slot_without_emptying_the_batch():
    clock = FakeClock()
    sched = make_sched(clock, policy="inlaid", slots=1, aging_s=1.0, max_num_seqs=4)
    sched.policy.adaptive_aging = False
    sched.add_request(make_req("hot0", adapter="hot", max_tokens=3))
    _step(sched, clock)
    sched.add_request(make_req("cold", adapter="cold", max_tokens=2, arrival=clock.t))
    clock.t += 2.0  # cold is now starving
    sched.add_request(make_req("hot1", adapter="hot", max_tokens=3, arrival=clock.t))
    sched.add_request(make_req("base", adapter=None, max_tokens=3, arrival=clock.t))
    out = _step(sched, clock)
    ids = {s.request_id for s in out.scheduled}
    assert "base" in ids and "hot1" not in ids and "cold" not in ids  # hot drains, base still runs
    first_cold = None
    for _ in range(10):
        out = _step(sched, clock)
        if first_cold is None and any(s.request_id == "cold" for s in out.scheduled):
            first_cold = out
    assert first_cold is not None and "hot1" not in {s.request_id for s in first_cold.scheduled}
    run_to_completion(sched)


def test_adaptive_aging_deadline_scales_with_queue_and_service_rate_and_is_fixed_at_arrival():
    pol = _inlaid(aging_s=1.0, aging_factor=4.0)
    assert pol.aging_bound(100) == 1.0  # no service rate measured yet
    for i in range(11):  # 10 finishes per second
        r = make_req(f"f{i}")
        r.finished_time = i * 0.1
        pol.on_finish(r)
    assert pol.service_rate() == pytest.approx(10.0)
    assert pol.aging_bound(50) == pytest.approx(20.0)
    assert pol.aging_bound(1) == 1.0  # the floor
    pol._queue_len = 49
    r = make_req("x", arrival=3.0)
    pol.on_add(r, 3.0)
    assert pol.deadline_of(r) == pytest.approx(23.0)
    pol._queue_len = 1000  # a longer queue later does not move an existing deadline
    assert pol.deadline_of(r) == pytest.approx(23.0)
    assert not pol.starving(r, 22.0) and pol.starving(r, 23.5)
    r.arrival_time = 5.0  # a replay driver sets the true arrival after add_request: the deadline follows it
    assert pol.deadline_of(r) == pytest.approx(25.0) and not pol.starving(r, 24.0)
    fixed = _inlaid(aging_s=1.0, adaptive_aging=False)
    fixed._finish_times.extend([0.0, 1.0])
    assert fixed.aging_bound(1000) == 1.0
