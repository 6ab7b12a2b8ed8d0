"""Prefill batching: the online overhead estimator, the hold rule, and the inlaid policy on a hand-built run."""

from __future__ import annotations

import pytest

from core_helpers import FakeClock, fake_result, make_req, make_sched
from inlaid.core.inlaid_policy import InlaidPolicy
from inlaid.core.prefill_batching import PrefillBatcher, PrefillCostEstimator


def _feed(est: PrefillCostEstimator, base: float, p: float, tok: float, load: float, n: int = 40) -> None:
    for i in range(n):
        prefill = i % 3 != 0
        toks = (17 * i) % 200 + 5 if prefill else 0
        loads = (i % 5 == 1) * prefill
        est.observe(base + p * prefill + tok * toks + load * loads, prefill, toks, loads)


def test_estimator_recovers_fixed_overhead_tokens_and_loads_separately():
    est = PrefillCostEstimator()
    assert est.overhead() == 0.0 and est.coefficients() is None  # nothing measured yet
    _feed(est, base=0.012, p=0.09, tok=2e-5, load=0.03)
    base, p, tok, load = est.coefficients()
    assert base == pytest.approx(0.012, rel=1e-3) and p == pytest.approx(0.09, rel=1e-3)
    assert tok == pytest.approx(2e-5, rel=1e-2) and load == pytest.approx(0.03, rel=1e-3)


def test_per_token_cost_model_has_no_overhead_so_nothing_is_held():
    est = PrefillCostEstimator()
    _feed(est, base=0.033, p=0.0, tok=4.8e-4, load=0.036)
    assert est.overhead() == pytest.approx(0.0, abs=1e-6)
    b = PrefillBatcher(est)
    b.last_prefill = 0.0
    assert not b.defer([make_req("w", arrival=0.0)], running=60, now=0.01, any_starving=False)


def test_estimator_needs_both_step_kinds():
    est = PrefillCostEstimator(min_samples=4)
    for _ in range(10):
        est.observe(0.1, True, 10)
    assert est.coefficients() is None and est.overhead() == 0.0


def _batcher(p: float = 0.1, base: float = 0.01) -> PrefillBatcher:
    est = PrefillCostEstimator()
    _feed(est, base=base, p=p, tok=0.0, load=0.0)
    b = PrefillBatcher(est, max_hold_factor=4.0)
    b.last_prefill = 1.0
    return b


def test_hold_while_rent_is_below_running_times_overhead():
    b = _batcher(p=0.1)
    cands = [make_req(f"w{i}", arrival=0.9) for i in range(4)]
    # rent = 4 x (1.05 - 1.0) = 0.2 < 10 running x 0.1 = 1.0: hold
    assert b.defer(cands, running=10, now=1.05, any_starving=False)
    # rent = 4 x 0.3 = 1.2 >= 1.0: admit
    assert not b.defer(cands, running=10, now=1.3, any_starving=False)
    # fewer running requests to protect: admit sooner
    assert not b.defer(cands, running=1, now=1.05, any_starving=False)


def test_never_hold_starving_idle_or_past_the_cap_or_for_noise():
    b = _batcher(p=0.1)
    one = [make_req("w", arrival=1.0)]
    assert not b.defer(one, running=60, now=1.01, any_starving=True)
    assert not b.defer(one, running=0, now=1.01, any_starving=False)
    assert not b.defer([], running=60, now=1.01, any_starving=False)
    assert b.defer(one, running=60, now=1.39, any_starving=False)
    assert not b.defer(one, running=60, now=1.4, any_starving=False)  # 4 x overhead since the last prefill
    small = _batcher(p=0.005, base=0.03)  # overhead below one decode step: not worth holding
    assert not small.defer(one, running=60, now=1.001, any_starving=False)


def _run(policy: InlaidPolicy, arrivals: int = 100) -> tuple[int, list[float]]:
    """One new request per step (arrival at the step start) for ``arrivals`` steps, then drain; step time
    10 ms + 100 ms if anyone was admitted. Returns (steps that admitted someone, each request's wait from
    arrival to admission)."""
    clock = FakeClock()
    sched = make_sched(clock, num_blocks=512, slots=4, max_num_seqs=32, policy="inlaid")
    sched.policy = policy
    policy.attach(sched.slots, sched._running_adapters, sched.running, 32)
    prefill_steps, waits, n = 0, [], 0
    for _ in range(500):
        if n < arrivals:
            sched.add_request(make_req(f"r{n}", prompt_len=4, max_tokens=8, adapter="a", arrival=clock.t, eos=None))
            n += 1
        if not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        new = [s for s in out.scheduled if s.start_pos == 0]
        waits += [clock.t - sched.requests[s.request_id].arrival_time for s in new]
        prefill_steps += bool(new)
        clock.t += 0.01 + 0.1 * bool(new)
        sched.update(out, fake_result(out))
    assert n == arrivals and not sched.has_unfinished_requests() and len(waits) == arrivals
    return prefill_steps, waits


def test_inlaid_policy_batches_prefills_when_they_carry_a_fixed_cost():
    on, waits_on = _run(InlaidPolicy(aging_s=10.0))
    off, _ = _run(InlaidPolicy(aging_s=10.0, prefill_batching=False))
    assert off == 100  # one prefill step per arrival
    assert on <= off // 2
    assert max(waits_on) <= 4 * 0.1 + 0.11 + 1e-9  # the hold cap (4 x overhead) plus one step
