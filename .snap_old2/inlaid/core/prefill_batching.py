"""Prefill batching: measure what a step with prefill costs extra, and hold admissions while that is worth it.

Owns: ``PrefillCostEstimator`` (an online least-squares fit of step time on
[1, step has prefill, new prompt tokens, adapter loads] from the clock the scheduler already
uses) and ``PrefillBatcher`` (the rent-or-buy rule the inlaid policy applies
once per step).

Why: on CUDA the engine replays a captured graph for decode-only steps and runs
prefill eagerly, so a step that admits anyone costs a large fixed overhead on
top of its tokens (H200, 7B W4: ~90 ms vs ~12 ms, fitted from the serving
sweep's FIFO run, see ``benchmarks/results/engine_vs_sim_gpu.md``). Admitting
each arriving job in its own step makes every decoding request pay that
overhead again and again. Holding admissions for a few cheap decode steps lets
one prefill step serve many arrivals.

Rule (ski rental): with R requests running, a prefill step costs the running
batch about R x P request-seconds (P = the measured fixed overhead). Admission
is deferred while the accumulated wait of the waiting requests is below R x P,
and never when: P is not measured yet or is ~0 (per-token cost models: nothing
to save) or below ``min_ratio`` x a decode-only step (noise), nothing runs, the waiting requests would fill every free seat anyway,
or a waiting request is starving (aging wins). Until decode-only steps were
measured, one step in ``explore_every`` is held to measure them (steady arrivals
would otherwise make every step a prefill step). The wait any request adds is
therefore bounded by the time its queue accumulates R x P request-seconds.

Invariants: pure Python, no torch; times are seconds from the scheduler clock;
``overhead()`` is >= 0 and 0 until both step kinds were seen ``min_samples`` times.
"""

from __future__ import annotations

from collections.abc import Sequence

from inlaid.core.linsolve import SingularSystem, solve
from inlaid.request import Request

_K = 4
"""Regressors: 1, step has prefill, new prompt tokens, adapter loads."""


class PrefillCostEstimator:
    """Exponentially weighted least squares of step seconds on [1, has prefill, new prompt tokens, loads].

    Loads are a regressor of their own because they happen in the steps that admit: without it, their
    cost would be read as prefill overhead (and batching prefills saves no load)."""

    def __init__(self, decay: float = 0.98, min_samples: int = 4, ridge: float = 1e-9) -> None:
        if not 0.0 < decay <= 1.0 or min_samples < 1:
            raise ValueError(f"decay must be in (0, 1] and min_samples >= 1, got {decay}, {min_samples}")
        self.decay, self.min_samples, self.ridge = decay, min_samples, ridge
        self._xx = [[0.0] * _K for _ in range(_K)]
        self._xy = [0.0] * _K
        self.seen = [0, 0]
        """Samples seen without / with prefill."""
        self._fit: tuple[float, ...] | None = None
        self._fit_stale = True
        """The solved coefficients are cached until the next ``observe`` (the policy reads them twice a step)."""

    def observe(self, seconds: float, prefill: bool, new_tokens: float, loads: int = 0) -> None:
        """One step: its duration, whether it admitted anyone, their prompt tokens, adapters loaded for it."""
        if seconds <= 0.0:
            return
        x = (1.0, 1.0 if prefill else 0.0, float(new_tokens) if prefill else 0.0, float(loads))
        for i in range(_K):
            self._xy[i] = self._xy[i] * self.decay + x[i] * seconds
            for j in range(_K):
                self._xx[i][j] = self._xx[i][j] * self.decay + x[i] * x[j]
        self.seen[1 if prefill else 0] += 1
        self._fit_stale = True

    def coefficients(self) -> tuple[float, ...] | None:
        """(seconds per step, extra per prefill step, per new prompt token, per adapter load), or None."""
        if self._fit_stale:
            self._fit, self._fit_stale = self._solve(), False
        return self._fit

    def _solve(self) -> tuple[float, ...] | None:
        if min(self.seen) < self.min_samples:
            return None
        a = [[self._xx[i][j] + (self.ridge * max(self._xx[i][i], 1.0) if i == j else 0.0) for j in range(_K)]
             for i in range(_K)]
        try:
            return tuple(solve(a, self._xy))
        except SingularSystem:
            return None

    def decode_step(self) -> float:
        """Fitted seconds of a step that admits nobody (>= 0; 0 until measured)."""
        c = self.coefficients()
        return max(c[0], 0.0) if c is not None else 0.0

    def overhead(self) -> float:
        """Extra seconds of a step with prefill beyond its per-token cost (>= 0; 0 until measured)."""
        c = self.coefficients()
        return max(c[1], 0.0) if c is not None else 0.0


class PrefillBatcher:
    """Feeds the estimator from ``Policy.on_step`` and decides, once per step, whether to hold admissions."""

    def __init__(self, estimator: PrefillCostEstimator | None = None, max_hold_factor: float = 4.0,
                 explore_every: int = 4, min_ratio: float = 1.0) -> None:
        if max_hold_factor <= 0 or explore_every < 1:
            raise ValueError(f"max_hold_factor must be > 0 and explore_every >= 1, got {max_hold_factor}, "
                             f"{explore_every}")
        self.explore_every = explore_every
        self.min_ratio = min_ratio
        """Batch only when the overhead is at least this multiple of a decode-only step (below that,
        holding a step costs the candidates about as much as it saves the batch)."""
        self._since_explore = 0
        self.estimator = estimator if estimator is not None else PrefillCostEstimator()
        self.max_hold_factor = max_hold_factor
        self._last_now: float | None = None
        self._last_ran: set[str] = set()
        self._idle_before = True
        self.last_prefill = float("-inf")
        """Clock at the end of the last step that admitted anyone."""
        self.deferred_steps = 0

    def on_step(self, ran: Sequence[Request], now: float, running_after: int, loads: int = 0) -> None:
        """Record the step that just ended (``ran``: requests that computed tokens in it; ``loads``:
        adapters that became resident for it)."""
        ids = {r.request_id for r in ran}
        new = [r for r in ran if r.request_id not in self._last_ran]
        if self._last_now is not None and not self._idle_before and ran:
            self.estimator.observe(now - self._last_now, bool(new), sum(r.num_prompt_tokens for r in new), loads)
        if new:
            self.last_prefill = now
        self._last_now, self._last_ran = now, ids
        self._idle_before = running_after == 0

    def _explore(self, now: float) -> bool:
        """Hold one step in ``explore_every`` while decode-only steps are too few to measure the overhead
        (under steady arrivals every step admits someone, so the estimator would never see one)."""
        est = self.estimator
        if est.seen[0] >= est.min_samples or est.seen[1] < est.min_samples:
            return False
        self._since_explore += 1
        if self._since_explore < self.explore_every:
            return False
        self._since_explore = 0
        return True

    def defer(self, candidates: Sequence[Request], running: int, now: float, any_starving: bool) -> bool:
        """True when this step should admit nobody.

        ``candidates``: the waiting requests this step would admit (the first free seats' worth, in
        policy order). Their *rent* is the wait that holding has cost them since the last prefill step
        (or their arrival); hold while it is below ``running`` x the measured overhead, and for at most
        ``max_hold_factor`` x the overhead since the last prefill step.
        """
        if running == 0 or not candidates or any_starving:
            return False
        if self._explore(now):
            self.deferred_steps += 1
            return True
        p = self.estimator.overhead()
        if p <= 0.0 or p < self.min_ratio * self.estimator.decode_step() or now - self.last_prefill >= self.max_hold_factor * p:
            return False
        rent = sum(max(now - max(r.arrival_time, self.last_prefill), 0.0) for r in candidates)
        hold = rent < running * p
        self.deferred_steps += hold
        return hold
