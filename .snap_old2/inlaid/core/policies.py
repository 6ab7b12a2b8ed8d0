"""Scheduling policies: the order of admission and the choice of preemption victims.

Owns: the ``Policy`` interface the scheduler calls, ``FifoPolicy`` (S-LoRA's
first come first served) and ``make_policy``. The multi-task policies live in
``mlfq.py`` (FastServe skip-join MLFQ) and ``inlaid_policy.py`` (SRTF + aging +
task grouping).

Invariants:
- Policies only order and filter; the scheduler alone enforces the token budget,
  ``max_num_seqs``, KV blocks and adapter slots, and mutates requests.
- ``order_waiting`` returns every waiting request exactly once (a permutation).
- ``pick_victim`` returns one of the given candidates; so does ``pick_slot_victim``
  (an adapter name; the default is the first, i.e. least recently used, candidate).
- ``outranks(w, r)`` is a strict order: a policy that returns True lets the
  scheduler preempt running ``r`` (by recompute) for waiting ``w`` when ``w``
  cannot otherwise get a seat or KV blocks. The default never does (no priority
  preemption), and a request never outranks itself or one of equal priority, so
  a preempted request cannot preempt its preemptor back.
- Pure Python, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from inlaid.config import SchedulerConfig
from inlaid.request import Request

if TYPE_CHECKING:
    from inlaid.core.adapter_slots import AdapterSlots
    from inlaid.core.predictor import LengthPredictor


class Policy:
    """Base policy: FIFO order, latest arrival is preempted first, no grouping."""

    name = "base"
    preempts_for_priority = False
    """True when ``outranks`` can return True (the scheduler then checks for priority preemption each step)."""

    def attach(self, slots: AdapterSlots, running_adapters: Mapping[str, int], running: Sequence[Request] = (),
               max_num_seqs: int = 1 << 30) -> None:
        """Called once by the scheduler: live views of the adapter slots, running adapter counts
        and running requests, and the step's sequence cap."""
        self.slots = slots
        self.running_adapters = running_adapters
        self.running = running
        self.max_num_seqs = max_num_seqs

    def holds_line(self, req: Request, now: float) -> bool:
        """True when admission must stop (not skip) at ``req`` if its adapter cannot get a slot.

        Policies return True for starving requests so that running requests drain and
        free a slot for them, instead of later requests overtaking forever.
        """
        return False

    def on_add(self, req: Request, now: float) -> None:
        """A request entered the waiting queue for the first time."""

    def order_waiting(self, waiting: Sequence[Request], now: float) -> list[Request]:
        """Waiting requests in admission order (most urgent first)."""
        return sorted(waiting, key=lambda r: r.arrival_time)

    def can_admit(self, req: Request, now: float) -> bool:
        """Policy-level admission filter (task grouping); resources are checked by the scheduler.

        ``self.running_adapters`` counts running requests per adapter name (base model excluded).
        """
        return True

    def pick_victim(self, candidates: Sequence[Request]) -> Request:
        """The running request to preempt when KV blocks run out (default: latest arrival)."""
        return max(candidates, key=lambda r: r.arrival_time)

    def outranks(self, waiting: Request, running: Request) -> bool:
        """True when ``waiting`` should preempt ``running`` for a seat or KV (default: never)."""
        return False

    def pick_slot_victim(self, candidates: Sequence[str]) -> str:
        """The unpinned resident adapter to evict for a new one; candidates are in LRU order (default: LRU)."""
        return candidates[0]

    def on_step(self, scheduled: Sequence[Request], now: float) -> None:
        """Called after ``Scheduler.update`` with the requests that ran this step."""

    def on_preempt(self, req: Request, now: float) -> None:
        """``req`` was preempted back to the waiting queue."""

    def on_finish(self, req: Request) -> None:
        """``req`` left the scheduler (finished or aborted)."""


class FifoPolicy(Policy):
    """First come first served (S-LoRA): arrival order; preempt the latest arrival."""

    name = "fifo"


def make_policy(cfg: SchedulerConfig, predictor: LengthPredictor | None = None) -> Policy:
    """The policy named by ``cfg.policy`` ("fifo" | "mlfq" | "inlaid")."""
    if cfg.policy == "fifo":
        return FifoPolicy()
    if cfg.policy == "mlfq":
        from inlaid.core.mlfq import MlfqPolicy

        return MlfqPolicy(starvation_s=cfg.aging_s)
    if cfg.policy == "inlaid":
        from inlaid.core.inlaid_policy import InlaidPolicy

        return InlaidPolicy(max_adapters_per_step=cfg.max_adapters_per_step, aging_s=cfg.aging_s, predictor=predictor)
    raise ValueError(f"unknown policy {cfg.policy!r}: use fifo, mlfq or inlaid")
