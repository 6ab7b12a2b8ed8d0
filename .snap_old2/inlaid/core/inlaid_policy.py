"""LoRA-Inlaid's policy: SRTF on predicted remaining output, aging, and task grouping.

Owns: the admission order and grouping rule of the ``inlaid`` policy.

Invariants:
- Order: starving requests (waiting longer than ``aging_s`` since arrival) come
  first, oldest first; then requests whose adapter is on the device (running or
  resident, or the base model) by predicted remaining output tokens
  (``Request.predicted_remaining``), shortest first (SRTF); then requests of
  off-device adapters, grouped by adapter: groups in decreasing *group value*
  (sum of 1 / predicted remaining over the group's waiting requests: one slot
  and one load serve the most short work), SRTF within a group. Device adapter
  slots are the scarce resource when tasks outnumber slots, so a slot goes to
  the adapter that turns it into the most finished requests soonest.
- Task grouping: under load (more than ``group_min_queue`` requests waiting), a
  request whose adapter is not already running is admitted only while fewer than
  ``max_adapters_per_step`` (β) distinct adapters run, so no step holds more than
  β distinct adapters -- unless the waiting requests of running adapters cannot
  fill the free sequence seats, in which case just enough other requests are
  admitted to fill them (work conserving: grouping never leaves seats empty
  while requests wait). With a short queue grouping is off. Starving requests are
  exempt (aging beats grouping: nothing starves), and they hold the line for an
  adapter slot.
- Predictions are kept fresh: with a ``predictor``, every ordering re-estimates
  the waiting requests that have not produced a token yet and whose prediction
  is the predictor's own first-stage estimate (checked when they are added;
  predictions set by anyone else are left alone) from the predictor's current
  statistics (one lookup per task and prompt bucket), so requests that arrived
  before their task was learned are not stuck behind a cold-start prior.
- Preemption victim: the running request with the longest predicted remaining.
- Prefill batching (``prefill_batching``, see ``prefill_batching.py``): the
  policy measures, from the scheduler clock, how much more a step that admits
  anyone costs than a decode-only step; while that overhead is worth more than
  the waiting requests' accumulated wait (ski rental), nobody is admitted this
  step, so one prefill step serves many arrivals. Off by itself when the measured
  overhead is ~0; never holds a starving request or seats the queue would fill.
- The ablation switches (``use_prediction``, ``use_grouping``, ``use_aging``,
  ``prefill_batching``) turn each ingredient off; without prediction the order
  uses ``max_tokens``.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from inlaid.core.policies import Policy
from inlaid.core.prefill_batching import PrefillBatcher
from inlaid.request import Request

if TYPE_CHECKING:
    from inlaid.core.predictor import LengthPredictor


class InlaidPolicy(Policy):
    """Length-guided SRTF with aging and task grouping (LoRA-Inlaid)."""

    name = "inlaid"

    def __init__(self, max_adapters_per_step: int = 10, aging_s: float = 10.0, use_prediction: bool = True, use_grouping: bool = True, use_aging: bool = True,
                 use_policy_eviction: bool = True, group_min_queue: int = 8, demand_window: int = 256,
                 adaptive_aging: bool = True, aging_factor: float = 4.0, rate_window: int = 128, predictor: LengthPredictor | None = None,
                 prefill_batching: bool = True) -> None:
        if max_adapters_per_step < 1:
            raise ValueError(f"max_adapters_per_step must be >= 1, got {max_adapters_per_step}")
        if aging_s <= 0:
            raise ValueError(f"aging_s must be > 0, got {aging_s}")
        self.beta = max_adapters_per_step
        self.aging_s = aging_s
        self.use_prediction = use_prediction
        self.use_grouping = use_grouping
        self.use_aging = use_aging
        self.use_policy_eviction = use_policy_eviction
        self._waiting_value: dict[str | None, float] = {}
        self._decay = 1.0 - 1.0 / demand_window
        if aging_factor <= 0 or rate_window < 2:
            raise ValueError(f"aging_factor must be > 0 and rate_window >= 2, got {aging_factor}, {rate_window}")
        self.adaptive_aging = adaptive_aging
        self.aging_factor = aging_factor
        self._finish_times: deque[float] = deque(maxlen=rate_window)
        self._bound: dict[str, float] = {}
        """request id -> its aging bound (seconds after arrival), fixed when it arrived."""
        self._arrivals = 0
        self._demand_of: dict[str | None, tuple[float, int]] = {}
        self.group_min_queue = group_min_queue
        self.predictor = predictor
        self._refreshable: set[str] = set()
        self._queue_len = 0
        self._waiting_by_adapter: Counter = Counter()
        self.batcher = PrefillBatcher() if prefill_batching else None
        self._hold = False
        self._resident_before: set[str] = set()
        """True for a step in which prefill batching admits nobody."""

    def remaining(self, req: Request) -> float:
        """Predicted output tokens still to come (``max_tokens`` bound without prediction)."""
        if self.use_prediction:
            return req.predicted_remaining()
        return float(max(req.sampling_params.max_tokens - req.num_output_tokens, 1))

    def service_rate(self) -> float:
        """Completions per second over the last ``len(self._finish_times)`` finishes (0 before two)."""
        ft = self._finish_times
        return (len(ft) - 1) / (ft[-1] - ft[0]) if len(ft) > 1 and ft[-1] > ft[0] else 0.0

    def aging_bound(self, queue_len: int) -> float:
        """Seconds a request that finds ``queue_len`` waiting requests may wait before it is promoted:
        ``aging_s``, or with adaptive aging ``max(aging_s, aging_factor x queue_len / measured service
        rate)`` -- a multiple of the wait FIFO would give it, so overload does not make everybody
        'starving' (a fixed bound below the queueing delay degenerates to FIFO)."""
        rate = self.service_rate()
        if not self.adaptive_aging or rate <= 0.0:
            return self.aging_s
        return max(self.aging_s, self.aging_factor * queue_len / rate)

    def deadline_of(self, req: Request) -> float:
        """When the waiting request ``req`` becomes starving: its arrival time + the bound fixed when it arrived.

        The bound (a duration) is stored, not the deadline, so a driver that sets ``arrival_time``
        after ``add_request`` (the engine replay) still gets deadlines relative to the real arrival.
        """
        return req.arrival_time + self._bound.get(req.request_id, self.aging_s)

    def starving(self, req: Request, now: float) -> bool:
        """Waiting past its deadline (fixed when it arrived, so the wait of every request is bounded)."""
        return self.use_aging and now > self.deadline_of(req)

    def _on_device(self, adapter: str | None) -> bool:
        if adapter is None or not self.use_grouping:
            return True
        return adapter in self.running_adapters or self.slots.is_resident(adapter)

    def _first_stage(self, r: Request) -> float:
        assert self.predictor is not None
        return min(max(self.predictor.estimate(r.adapter, r.num_prompt_tokens), 1.0),
                   float(r.sampling_params.max_tokens))

    def _demand(self, adapter: str | None) -> float:
        """Arrivals of ``adapter`` over about the last ``demand_window`` arrivals (exponentially decayed)."""
        value, seen = self._demand_of.get(adapter, (0.0, self._arrivals))
        return value * self._decay ** (self._arrivals - seen)

    def on_add(self, req: Request, now: float) -> None:
        if req.num_output_tokens == 0 and req.num_computed_tokens == 0:
            self._arrivals += 1
            self._demand_of[req.adapter] = (self._demand(req.adapter) + 1.0, self._arrivals)
            self._queue_len += 1
            self._bound[req.request_id] = self.aging_bound(self._queue_len)
        if self.predictor is not None and req.predicted_output_len == self._first_stage(req):
            self._refreshable.add(req.request_id)

    def on_finish(self, req: Request) -> None:
        self._refreshable.discard(req.request_id)
        self._bound.pop(req.request_id, None)
        if req.finished_time is not None:
            self._finish_times.append(req.finished_time)

    def refresh_predictions(self, waiting: Sequence[Request]) -> None:
        """Re-estimate the first-stage prediction of waiting requests that have produced nothing yet."""
        if self.predictor is None or not self.use_prediction:
            return
        memo: dict[tuple[str | None, int, int], float] = {}
        for r in waiting:
            if r.num_output_tokens or r.request_id not in self._refreshable:
                continue
            k = (r.adapter, self.predictor.bucket_of(r.num_prompt_tokens), r.sampling_params.max_tokens)
            if k not in memo:
                memo[k] = self._first_stage(r)
            r.predicted_output_len = memo[k]

    def order_waiting(self, waiting: Sequence[Request], now: float) -> list[Request]:
        self.refresh_predictions(waiting)
        self._queue_len = len(waiting)

        value: dict[str | None, float] = {}
        waiting_value: dict[str | None, float] = {}
        for r in waiting:
            v = 1.0 / self.remaining(r)
            waiting_value[r.adapter] = waiting_value.get(r.adapter, 0.0) + v
            if not self._on_device(r.adapter):
                value[r.adapter] = value.get(r.adapter, 0.0) + v
        self._waiting_value = waiting_value

        def key(r: Request) -> tuple[int, float, float]:
            if self.starving(r, now):
                return (0, r.arrival_time, 0.0)
            if r.adapter not in value:
                return (1, self.remaining(r), r.arrival_time)
            return (2, -value[r.adapter], self.remaining(r))

        self._waiting_by_adapter = Counter(r.adapter for r in waiting)
        ordered = sorted(waiting, key=key)
        self._hold = self._defer_prefill(ordered, now)
        return ordered

    def _defer_prefill(self, ordered: Sequence[Request], now: float) -> bool:
        """Prefill batching's hold decision for this step (the candidates: the first free seats' worth)."""
        if self.batcher is None:
            return False
        free = max(self.max_num_seqs - len(self.running), 0)
        starving = bool(ordered) and self.starving(ordered[0], now)  # starving requests sort first
        return self.batcher.defer(ordered[:free], len(self.running), now, starving)

    def on_step(self, scheduled: Sequence[Request], now: float) -> None:
        if self.batcher is not None:
            resident = set(self.slots.resident())
            loads = len(resident - self._resident_before)
            self._resident_before = resident
            self.batcher.on_step(scheduled, now, len(self.running), loads)

    def _grouped_supply(self) -> int:
        """Waiting requests that can join without a new adapter (base model or a running adapter)."""
        counts = self._waiting_by_adapter
        return counts.get(None, 0) + sum(counts.get(a, 0) for a in self.running_adapters)

    def can_admit(self, req: Request, now: float) -> bool:
        if self._hold:
            return False
        ok = self._can_admit(req, now)
        if ok and self._waiting_by_adapter.get(req.adapter, 0) > 0:
            self._waiting_by_adapter[req.adapter] -= 1
        return ok

    def _can_admit(self, req: Request, now: float) -> bool:
        running = self.running_adapters
        if not self.use_grouping or req.adapter is None or req.adapter in running:
            return True
        if self._queue_len <= self.group_min_queue or len(running) < self.beta or self.starving(req, now):
            return True
        # work conserving: exceed β only for seats that grouped requests cannot fill
        return self._grouped_supply() < self.max_num_seqs - len(self.running)

    def holds_line(self, req: Request, now: float) -> bool:
        return self.starving(req, now)

    def pick_slot_victim(self, candidates: Sequence[str]) -> str:
        """Evict an adapter with no waiting requests first (LRU among them), else the one whose waiting
        work is worth least (smallest group value); LRU when policy-aware eviction is off."""
        if not self.use_policy_eviction:
            return candidates[0]
        return min(candidates, key=lambda a: (self._waiting_value.get(a, 0.0), self._demand(a)))

    def pick_victim(self, candidates: Sequence[Request]) -> Request:
        return max(candidates, key=lambda r: (self.remaining(r), r.arrival_time))
