"""Continuous batching by token counts with chunked prefill (vLLM-V1 style), policies plug in.

Owns: the waiting and running queues, each request's KV blocks (via
``BlockManager``) and adapter slot pins (via ``AdapterSlots``), and the step
protocol ``schedule() -> SchedulerOutput``, ``update(out, RunnerOutput)``.

Invariants:
- A step schedules at most ``max_num_seqs`` sequences and at most
  ``max_num_batched_tokens`` tokens. Running requests go first (one decode token,
  or their next prefill chunk); then waiting requests are admitted in policy
  order, each getting ``min(uncomputed tokens, budget left)`` tokens.
- A RUNNING request owns KV blocks for its computed + scheduled tokens and pins
  its adapter's slot; a WAITING request owns no blocks and pins nothing.
- Preemption is by recompute: blocks freed, ``num_computed_tokens = 0``, back to
  WAITING with its generated tokens kept (prefill then covers prompt + outputs).
  It happens (a) when KV blocks run out for a running request (victim =
  ``policy.pick_victim``), and (b) for priority, before running requests are
  scheduled, when the policy says a waiting request ``outranks`` the victim and
  the waiting request cannot otherwise get a seat or KV blocks (MLFQ). After (a)
  nothing new is admitted that step; after (b) admission goes on in policy order.
- Adapter slot eviction picks its victim through ``policy.pick_slot_victim``.
- Every ``adapter_slot`` in a ``SchedulerOutput`` holds that adapter once
  ``adapter_loads`` are applied.
- Starvation: when a request the policy says ``holds_line`` (starving) cannot get
  an adapter slot, the pinned adapter with the fewest running requests admits no
  new request until its slot frees (its running count only falls, so the slot
  frees in bounded time and the starving request, first in policy order, takes
  it); every other admission goes on, so the batch does not empty.
- ``schedule_ahead(prev)`` plans the step after ``prev`` *before* ``update(prev)`` (the engine overlaps the
  host's work with the device, ``LLMEngine``). It does so only in steady decode: ``prev`` sampled every one of
  its sequences, they are the running requests in the same order, none can finish by length at ``prev``, no
  waiting request could be admitted or preempt, and the KV blocks for one more token each are free. It then
  schedules one token per running request (``PENDING_TOKEN``: the device feeds ``prev``'s sampled ids) and
  never preempts, loads an adapter or admits. ``update`` needs no change: it runs for ``prev`` first, and a
  request that finishes there (EOS, stop string, abort) is skipped when the ahead step's results arrive.
- Pure Python, no torch; time comes from the injected ``clock``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from inlaid.config import SchedulerConfig
from inlaid.core.adapter_slots import AdapterSlots
from inlaid.core.block_manager import BlockManager
from inlaid.core.outputs import PENDING_TOKEN, RunnerOutput, ScheduledSeq, SchedulerOutput
from inlaid.core.policies import Policy, make_policy
from inlaid.core.predictor import LengthPredictor
from inlaid.request import Request, RequestStatus

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue holds ``max_queue_len`` requests; retry later (HTTP 503)."""


@dataclass
class SchedulerStats:
    """Counters since construction."""

    steps: int = 0
    preemptions: int = 0
    adapter_loads: int = 0
    scheduled_tokens: int = 0
    scheduled_seqs: int = 0
    distinct_adapters_sum: int = 0
    """Sum over steps of distinct (non-base) adapters in the step."""
    distinct_adapters_hist: Counter = field(default_factory=Counter)
    """distinct adapters in a step -> number of steps."""
    finished: int = 0
    aborted: int = 0

    @property
    def mean_distinct_adapters(self) -> float:
        return self.distinct_adapters_sum / self.steps if self.steps else 0.0


class Scheduler:
    """Decides, each step, which tokens of which requests the runner computes."""

    def __init__(
        self,
        sched_cfg: SchedulerConfig,
        num_blocks: int,
        block_size: int,
        num_adapter_slots: int,
        max_model_len: int,
        clock: Callable[[], float] = time.monotonic,
        predictor: LengthPredictor | None = None,
        policy: Policy | None = None,
    ) -> None:
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
        self.cfg = sched_cfg
        self.max_model_len = max_model_len
        self.clock = clock
        self.predictor = predictor if predictor is not None else LengthPredictor()
        self.policy = policy if policy is not None else make_policy(sched_cfg, self.predictor)
        self.block_manager = BlockManager(num_blocks, block_size)
        self.slots = AdapterSlots(num_adapter_slots)
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.stats = SchedulerStats()
        self._finished_ids: list[str] = []
        self._running_adapters: Counter = Counter()
        self.policy.attach(self.slots, self._running_adapters, self.running, sched_cfg.max_num_seqs)

    # ----------------------------------------------------------------- queries
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def kv_usage(self) -> float:
        """Fraction of KV blocks in use, in [0, 1]."""
        return self.block_manager.usage()

    def resident_adapters(self) -> dict[str, int]:
        """name -> device slot of every resident adapter."""
        return self.slots.resident()

    # ----------------------------------------------------------- request entry
    def _validate(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use; give a unique id")
        total = req.num_prompt_tokens + req.sampling_params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({req.num_prompt_tokens} tokens) + max_tokens ({req.sampling_params.max_tokens}) = {total} "
                f"exceeds max_model_len {self.max_model_len}: shorten the prompt or lower max_tokens"
            )
        if req.adapter is not None and self.slots.num_slots == 0:
            raise ValueError(f"request asks for adapter {req.adapter!r} but there are 0 adapter slots: raise max_loras")
        bm = self.block_manager
        kv_tokens = total - 1  # the last sampled token's KV is never computed
        if bm.blocks_for_tokens(kv_tokens) > bm.num_blocks:
            raise ValueError(
                f"request needs {kv_tokens} KV tokens but the cache holds {bm.num_blocks * bm.block_size}: "
                "shorten the prompt, lower max_tokens or give the KV cache more blocks"
            )

    def add_request(self, req: Request) -> None:
        """Queue a new request (WAITING). Raises ``QueueFullError`` or ``ValueError``."""
        if len(self.waiting) >= self.cfg.max_queue_len:
            raise QueueFullError(f"waiting queue is full ({self.cfg.max_queue_len} requests); retry later")
        self._validate(req)
        if req.predicted_output_len is None:
            self.predictor.predict(req)
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self.waiting.append(req)
        self.policy.on_add(req, self.clock())

    # ------------------------------------------------------------ request exit
    def _release(self, req: Request) -> None:
        """Free a request's blocks and, if running, its adapter pin."""
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
            self.slots.release(req.adapter)
            if req.adapter is not None:
                self._running_adapters[req.adapter] -= 1
                if self._running_adapters[req.adapter] <= 0:
                    del self._running_adapters[req.adapter]
        elif req in self.waiting:
            self.waiting.remove(req)
        self.block_manager.free(req)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        self._release(req)
        req.status = status
        req.finished_time = self.clock()
        del self.requests[req.request_id]
        self._finished_ids.append(req.request_id)
        self.policy.on_finish(req)
        if status == RequestStatus.FINISHED_ABORTED:
            self.stats.aborted += 1
        else:
            self.stats.finished += 1
        if status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH):
            self.predictor.observe(req)

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """End a live request with a finished ``status`` (e.g. the engine matched a stop string)."""
        if not status.finished:
            raise ValueError(f"finish_request needs a FINISHED_* status, got {status}")
        req = self.requests.get(request_id)
        if req is not None:
            self._finish(req, status)

    def abort_requests(self, ids: Iterable[str]) -> list[Request]:
        """Abort live requests (unknown ids are ignored); returns the aborted requests."""
        aborted = []
        for rid in ids:
            req = self.requests.get(rid)
            if req is not None:
                self._finish(req, RequestStatus.FINISHED_ABORTED)
                aborted.append(req)
        return aborted

    def remove_adapter(self, name: str) -> None:
        """Free ``name``'s device slot if no running request pins it."""
        if not self.slots.remove(name) and self.slots.is_resident(name):
            logger.warning("adapter %r is pinned by running requests; its slot stays", name)

    # ---------------------------------------------------------------- schedule
    def _seq(self, req: Request, n: int, slot: int, total: int | None = None) -> ScheduledSeq:
        """``total``: ``req.num_tokens`` when the caller has it (saves recomputing it per sequence per step)."""
        start = req.num_computed_tokens
        tokens = _token_slice(req, start, start + n)
        return ScheduledSeq(
            request_id=req.request_id,
            token_ids=tokens,
            start_pos=start,
            block_ids=list(self.block_manager.block_table(req.request_id)),
            adapter_slot=slot,
            sample=start + n == (req.num_tokens if total is None else total),
            sampling_params=req.sampling_params,
            num_output_tokens=req.num_output_tokens,
        )

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self._release(req)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.waiting.append(req)
        out.preempted_ids.append(req.request_id)
        self.stats.preemptions += 1
        self.policy.on_preempt(req, self.clock())
        logger.debug("preempted %s (recompute)", req.request_id)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        """Give running requests their next tokens, preempting by policy when blocks run out."""
        done: set[str] = set()
        for req in list(self.running):
            if req.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if budget <= 0 or len(out.scheduled) >= self.cfg.max_num_seqs:
                break
            total = req.num_tokens
            n = min(total - req.num_computed_tokens, budget)
            need = self.block_manager.num_new_blocks(req, n)  # depends on req's own table only
            while need > self.block_manager.num_free_blocks:
                candidates = [r for r in self.running if r.request_id not in done]
                victim = self.policy.pick_victim(candidates)
                self._preempt(victim, out)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                continue
            if need:  # a decode step usually fits the last block: nothing to allocate
                self.block_manager.allocate_for(req, n)
            out.scheduled.append(self._seq(req, n, self.slots.slot_of(req.adapter), total))  # type: ignore[arg-type]
            done.add(req.request_id)
            budget -= n
        return budget

    def _preempt_for_priority(self, out: SchedulerOutput, ordered: list[Request]) -> None:
        """Preempt running requests that waiting ones outrank, when those cannot otherwise get in."""
        bm = self.block_manager
        seats = self.cfg.max_num_seqs - len(self.running)
        free = bm.num_free_blocks
        pool = list(self.running)
        for w in ordered:
            if not self.slots.can_acquire(w.adapter):
                continue  # preempting would not give it a slot (all pinned)
            need = bm.blocks_for_tokens(min(w.num_tokens - w.num_computed_tokens, self.cfg.max_num_batched_tokens))
            while pool and (seats <= 0 or need > free):
                outranked = [r for r in pool if self.policy.outranks(w, r)]
                if not outranked:
                    return
                victim = self.policy.pick_victim(outranked)
                pool.remove(victim)
                free += len(bm.block_table(victim.request_id))
                seats += 1
                self._preempt(victim, out)
            if seats <= 0 or need > free:
                return
            seats -= 1
            free -= need

    def _admit(self, req: Request, n: int, out: SchedulerOutput, now: float) -> None:
        slot, loaded = self.slots.acquire(req.adapter, self.policy.pick_slot_victim)
        if loaded:
            out.adapter_loads[slot] = req.adapter  # type: ignore[assignment]
        if req.adapter is not None:
            self._running_adapters[req.adapter] += 1
        self.block_manager.allocate_for(req, n)
        req.status = RequestStatus.RUNNING
        if req.first_scheduled_time is None:
            req.first_scheduled_time = now
        self.running.append(req)
        out.scheduled.append(self._seq(req, n, slot))

    def _drain_target(self) -> str | None:
        """The pinned adapter with the fewest running requests (least recently used on ties): a starving
        request that cannot get a slot reserves it, so it admits nobody new until its slot frees."""
        counts = self._running_adapters
        return min(self.slots.resident(), key=lambda a: counts.get(a, 0), default=None)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, now: float,
                          ordered: list[Request] | None = None) -> int:
        """Admit waiting requests in policy order while budget, seqs, blocks and slots allow."""
        admitted: set[int] = set()
        draining: str | None = None
        for req in ordered if ordered is not None else self.policy.order_waiting(self.waiting, now):
            if budget <= 0 or len(out.scheduled) >= self.cfg.max_num_seqs:
                break
            if req.adapter is not None and req.adapter == draining:
                continue  # its slot is reserved for a starving request
            if not self.policy.can_admit(req, now):
                continue
            if not self.slots.can_acquire(req.adapter):
                if draining is None and self.policy.holds_line(req, now):
                    draining = self._drain_target()
                continue  # its adapter cannot get a slot this step
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.block_manager.can_allocate(req, n):
                break  # keep policy order: do not let later requests overtake on memory
            self._admit(req, n, out, now)
            admitted.add(id(req))
            budget -= n
        if admitted:
            self.waiting = [r for r in self.waiting if id(r) not in admitted]
        return budget

    def schedule(self) -> SchedulerOutput:
        """Plan one step: which tokens of which requests to compute, adapter loads, preemptions."""
        now = self.clock()
        out = SchedulerOutput(finished_ids=self._finished_ids)
        self._finished_ids = []
        ordered = None
        if self.waiting and self.running and self.policy.preempts_for_priority:
            ordered = self.policy.order_waiting(self.waiting, now)
            self._preempt_for_priority(out, ordered)
            if out.preempted_ids:
                ordered = None  # the victims joined the waiting queue: order again
        n_priority = len(out.preempted_ids)
        budget = self._schedule_running(out, self.cfg.max_num_batched_tokens)
        can_admit = budget > 0 and len(out.scheduled) < self.cfg.max_num_seqs
        if self.waiting and len(out.preempted_ids) == n_priority and can_admit:
            self._schedule_waiting(out, budget, now, ordered)
        self._record(out)
        return out

    def schedule_ahead(self, prev: SchedulerOutput) -> SchedulerOutput | None:
        """Plan the step after ``prev`` before its results are applied, or None when decode is not steady
        (see the module docstring; the caller then runs ``update(prev)`` and ``schedule()`` as usual)."""
        if not self._steady(prev):
            return None
        bm = self.block_manager
        plan = []  # (request, tokens to hold beyond the computed ones: prev's (not yet counted) + one, new blocks)
        for req, seq in zip(self.running, prev.scheduled):
            g = len(seq.token_ids) + 1
            plan.append((req, g, bm.num_new_blocks(req, g), seq.adapter_slot))
        if sum(p[2] for p in plan) > bm.num_free_blocks:
            return None
        out = SchedulerOutput(finished_ids=self._finished_ids, ahead=True)
        self._finished_ids = []
        for req, g, new_blocks, slot in plan:
            table = bm.allocate_for(req, g) if new_blocks else bm.block_table(req.request_id)
            out.scheduled.append(ScheduledSeq(
                request_id=req.request_id, token_ids=[PENDING_TOKEN], start_pos=req.num_computed_tokens + g - 1,
                block_ids=list(table), adapter_slot=slot, sample=True, sampling_params=req.sampling_params,
                num_output_tokens=req.num_output_tokens + 1,
            ))
        self._record(out)
        return out

    def _steady(self, prev: SchedulerOutput) -> bool:
        """True when ``prev`` (scheduled, not yet updated) is followed by the same decode batch for sure."""
        cfg = self.cfg
        if prev.is_empty or prev.preempted_ids or len(prev.scheduled) != len(self.running):
            return False
        if len(self.running) > cfg.max_num_batched_tokens:
            return False
        seats_full = len(self.running) >= cfg.max_num_seqs and not self.policy.preempts_for_priority
        if self.waiting and not seats_full:  # an admission (or priority preemption) may change the batch
            return False
        for seq, req in zip(prev.scheduled, self.running):
            if seq.request_id != req.request_id or not seq.sample or seq.start_pos != req.num_computed_tokens:
                return False
            if (req.num_output_tokens + 1 >= req.sampling_params.max_tokens
                    or req.num_tokens + 1 >= self.max_model_len):  # prev's token ends it by length
                return False
        return True

    def _record(self, out: SchedulerOutput) -> None:
        if out.is_empty:
            return
        st = self.stats
        st.steps += 1
        st.adapter_loads += len(out.adapter_loads)
        st.scheduled_tokens += out.num_batched_tokens
        st.scheduled_seqs += len(out.scheduled)
        distinct = len({s.adapter_slot for s in out.scheduled if s.adapter_slot >= 0})
        st.distinct_adapters_sum += distinct
        st.distinct_adapters_hist[distinct] += 1

    # ------------------------------------------------------------------ update
    def _stop_status(self, req: Request) -> RequestStatus | None:
        params = req.sampling_params
        last = req.output_token_ids[-1]
        if not params.ignore_eos and req.eos_token_id is not None and last == req.eos_token_id:
            return RequestStatus.FINISHED_STOPPED
        if last in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= params.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def update(self, out: SchedulerOutput, result: RunnerOutput) -> list[Request]:
        """Apply a step's results; returns every request that got a token or finished."""
        now = self.clock()
        changed: list[Request] = []
        ran: list[Request] = []
        for seq in out.scheduled:
            req = self.requests.get(seq.request_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue  # aborted or finished between schedule() and update()
            req.num_computed_tokens += len(seq.token_ids)
            ran.append(req)
            if not seq.sample:
                continue
            if seq.request_id not in result.sampled:
                raise ValueError(f"runner output has no sampled token for {seq.request_id!r}")
            req.output_token_ids.append(int(result.sampled[seq.request_id]))
            if req.first_token_time is None:
                req.first_token_time = now
            status = self._stop_status(req)
            if status is not None:
                self._finish(req, status)
            changed.append(req)
        self.policy.on_step(ran, now)
        return changed


def _token_slice(req: Request, lo: int, hi: int) -> list[int]:
    """``req.all_token_ids[lo:hi]`` without building prompt + outputs (a decode step needs one token, and
    concatenating the whole sequence per request per step made scheduling O(length))."""
    p = req.num_prompt_tokens
    if lo >= p:
        return req.output_token_ids[lo - p : hi - p]
    if hi <= p:
        return req.prompt_token_ids[lo:hi]
    return req.prompt_token_ids[lo:] + req.output_token_ids[: hi - p]
