import random

import pytest

from core_helpers import FakeClock, check_output, fake_result, make_req, make_sched, run_to_completion
from inlaid.config import SchedulerConfig
from inlaid.core.inlaid_policy import InlaidPolicy
from inlaid.core.mlfq import MlfqPolicy
from inlaid.core.policies import FifoPolicy, make_policy


def _pred(rid, pred, **kw):
    req = make_req(rid, **kw)
    req.predicted_output_len = float(pred)
    return req


def test_make_policy_names():
    assert isinstance(make_policy(SchedulerConfig(policy="fifo")), FifoPolicy)
    assert isinstance(make_policy(SchedulerConfig(policy="mlfq")), MlfqPolicy)
    pol = make_policy(SchedulerConfig(policy="inlaid", max_adapters_per_step=3, aging_s=2.0))
    assert isinstance(pol, InlaidPolicy) and pol.beta == 3 and pol.aging_s == 2.0


def test_inlaid_orders_by_predicted_remaining_fifo_by_arrival():
    reqs = [(_pred("long", 50, max_tokens=64, arrival=0.0)), _pred("short", 3, max_tokens=64, arrival=1.0),
            _pred("mid", 10, max_tokens=64, arrival=2.0)]
    for policy, want in [("inlaid", ["short", "mid", "long"]), ("fifo", ["long", "short", "mid"])]:
        sched = make_sched(policy=policy, max_num_seqs=1)
        for r in reqs:
            r.status = r.status.WAITING
            r.output_token_ids.clear()
            r.num_computed_tokens = 0
            sched.add_request(r)
        order = [s.request_id for o in run_to_completion(sched) for s in o.scheduled if s.start_pos == 0]
        assert order == want, policy


def test_inlaid_aging_bounds_the_wait_of_a_long_request():
    clock = FakeClock()
    sched = make_sched(clock, policy="inlaid", aging_s=1.0, max_num_seqs=1)
    sched.add_request(_pred("long", 60, max_tokens=64, arrival=0.0))
    n = 0
    started = None
    while started is None:  # an endless stream of short requests
        sched.add_request(_pred(f"s{n}", 2, max_tokens=2, arrival=clock.t))
        n += 1
        out = sched.schedule()
        if any(s.request_id == "long" for s in out.scheduled):
            started = clock.t
        sched.update(out, fake_result(out))
        clock.t += 0.1
        assert clock.t < 5.0, "long request starved"
    assert 1.0 < started <= 1.0 + 0.3  # admitted as soon as it aged and a seat freed
    no_aging = make_sched(FakeClock(), policy="inlaid", aging_s=1.0, max_num_seqs=1)
    no_aging.policy.use_aging = False
    assert not no_aging.policy.starving(make_req("x"), 100.0)


def test_inlaid_beta_caps_distinct_adapters_per_step():
    sched = make_sched(policy="inlaid", max_adapters_per_step=2, aging_s=1e9, slots=8, max_num_seqs=4)
    rng = random.Random(1)
    for i in range(60):
        sched.add_request(make_req(f"r{i}", max_tokens=rng.randint(1, 6), adapter=f"t{i % 6}"))
    loaded_steps = 0
    while sched.num_waiting >= 30:  # plenty of requests of the running adapters to fill every seat
        out = sched.schedule()
        check_output(sched, out)
        assert len({s.adapter_slot for s in out.scheduled}) <= 2
        assert len(out.scheduled) == 4  # grouping never leaves seats empty here
        loaded_steps += 1
        sched.update(out, fake_result(out))
    assert loaded_steps >= 5
    run_to_completion(sched)
    assert sched.stats.finished == 60
    # the same workload under fifo mixes more adapters per step (the cap is what limits it)
    fifo = make_sched(policy="fifo", slots=8, max_num_seqs=4)
    for i in range(60):
        fifo.add_request(make_req(f"r{i}", max_tokens=3, adapter=f"t{i % 6}"))
    assert max(len({s.adapter_slot for s in o.scheduled}) for o in run_to_completion(fifo)) > 2


def test_inlaid_grouping_is_work_conserving():
    """When the running adapters have too few waiting requests, others fill the free seats."""
    sched = make_sched(policy="inlaid", max_adapters_per_step=1, aging_s=1e9, slots=8, max_num_seqs=8)
    for i in range(12):
        sched.add_request(_pred(f"r{i}", 5 + i, max_tokens=32, adapter="a" if i < 2 else f"t{i}"))
    out = sched.schedule()
    assert len(out.scheduled) == 8 and len({s.adapter_slot for s in out.scheduled}) > 1
    no_wc = make_sched(policy="inlaid", max_adapters_per_step=1, aging_s=1e9, slots=8, max_num_seqs=2)
    for i in range(12):
        no_wc.add_request(_pred(f"r{i}", 5 + i, max_tokens=32, adapter="a" if i < 4 else f"t{i}"))
    out = no_wc.schedule()  # "a" alone has enough waiting requests for both seats
    assert len(out.scheduled) == 2


def test_inlaid_prefers_adapters_on_device_on_near_ties():
    sched = make_sched(policy="inlaid", slots=4, max_num_seqs=1, aging_s=1e9)
    sched.add_request(_pred("warm", 3, max_tokens=16, adapter="a"))
    out = sched.schedule()
    sched.update(out, fake_result(out))
    sched.finish_request("warm", sched.requests["warm"].status.FINISHED_STOPPED)  # "a" stays resident
    sched.add_request(_pred("cold", 10, max_tokens=16, adapter="b"))
    sched.add_request(_pred("hot", 12, max_tokens=16, adapter="a"))
    out = sched.schedule()
    assert [s.request_id for s in out.scheduled] == ["hot"] and out.adapter_loads == {}


@pytest.mark.parametrize("policy, victim", [("fifo", "b"), ("inlaid", "a"), ("mlfq", "a")])
def test_preemption_victim_by_policy(policy, victim):
    # a: earlier arrival but predicted long (and a long prompt -> low mlfq level); b: later and short
    sched = make_sched(policy=policy, num_blocks=10, block_size=4, max_num_seqs=2)
    sched.add_request(_pred("a", 30, prompt_len=16, max_tokens=24, arrival=0.0))
    sched.add_request(_pred("b", 2, prompt_len=4, max_tokens=24, arrival=1.0))
    if policy == "mlfq":
        sched.policy.prefill_tokens_per_quantum = 1.0
        sched.policy.on_add(sched.requests["a"], 0.0)
    preempted = []
    while not preempted:
        out = sched.schedule()
        check_output(sched, out)
        preempted = out.preempted_ids
        sched.update(out, fake_result(out))
    assert preempted == [victim]


def test_mlfq_skip_join_demotion_and_promotion():
    pol = MlfqPolicy(num_levels=4, base_quantum=2, prefill_tokens_per_quantum=8.0, starvation_s=5.0)
    assert [pol.quantum(i) for i in range(4)] == [2, 4, 8, 16]
    assert pol.entry_level(make_req("s", prompt_len=8)) == 0  # cost 1 <= 2
    assert pol.entry_level(make_req("m", prompt_len=24)) == 1  # cost 3 <= 4
    assert pol.entry_level(make_req("l", prompt_len=500)) == 3  # capped at the last level
    sched = make_sched(policy="mlfq", max_num_seqs=4)
    sched.policy = pol
    pol.attach(sched.slots, sched._running_adapters)
    req = make_req("s", prompt_len=8, max_tokens=20)
    sched.add_request(req)
    levels = []
    for _ in range(8):
        out = sched.schedule()
        sched.update(out, fake_result(out))
        levels.append(pol.level["s"])
    assert levels == [0, 1, 1, 1, 1, 2, 2, 2]  # 2 tokens at level 0, then 4 at level 1
    old = make_req("old", prompt_len=500, arrival=0.0)
    pol.on_add(old, 0.0)
    young = make_req("young", prompt_len=8, arrival=5.5)
    pol.on_add(young, 5.5)
    assert [r.request_id for r in pol.order_waiting([young, old], 6.0)] == ["old", "young"]
    assert pol.level["old"] == 0


@pytest.mark.parametrize("policy", ["inlaid", "mlfq"])
def test_no_starvation_over_long_adversarial_run(policy):
    """Two hot adapters keep both slots pinned and short requests keep coming; a cold long one must finish."""
    clock = FakeClock()
    sched = make_sched(clock, policy=policy, slots=2, aging_s=2.0, max_num_seqs=4, num_blocks=400, max_model_len=2048)
    victim = _pred("cold", 40, prompt_len=1000, max_tokens=40, adapter="cold", arrival=1.0)
    rng = random.Random(0)
    bound = 2.0
    for step in range(3000):
        if step == 20:
            sched.add_request(victim)
            if policy == "inlaid":  # adaptive aging: the deadline is fixed at arrival, >= aging_s
                bound = sched.policy.deadline_of(sched.requests["cold"]) - victim.arrival_time
                assert 2.0 <= bound < 30.0
        for k in range(2):
            if sched.num_waiting < 20:
                sched.add_request(_pred(f"h{step}_{k}", 2, max_tokens=rng.randint(2, 6),
                                        adapter=rng.choice(["h1", "h2"]), arrival=clock.t))
        out = sched.schedule()
        check_output(sched, out)
        sched.update(out, fake_result(out))
        clock.t += 0.05
        if victim.is_finished:
            break
    assert victim.is_finished, f"{policy}: the cold request starved"
    assert victim.first_scheduled_time - victim.arrival_time <= bound + 1.0
