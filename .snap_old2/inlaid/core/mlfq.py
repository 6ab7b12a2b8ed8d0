"""FastServe's skip-join multi-level feedback queue (MLFQ), adapted to token-budget batching.

Owns: each live request's queue level, the output tokens it has attained at
that level, and when it last ran (for starvation).

Invariants:
- Level i has quantum ``base_quantum * 2**i`` output tokens (quantum doubling);
  level 0 is the most urgent.
- Skip-join: a new request enters the highest level whose quantum covers its
  prefill, measured in decode-token equivalents (``prompt_len / prefill_tokens_per_quantum``).
- Demotion: a request that has generated its level's quantum is demoted one level
  (never below the last level), attained count reset.
- Priority preemption (``outranks``): a waiting request of a strictly lower level
  preempts the lowest-priority running request (highest level, latest arrival)
  when it cannot otherwise get a seat or KV blocks. Our scheduler preempts by
  recompute (FastServe swaps the KV cache to host memory instead); the victim
  keeps its level and its generated tokens.
- Preemption guards (because recompute, unlike FastServe's KV swap, is not
  free): ``preempt_level_gap`` -- the waiting request's level must be at least
  this many levels above (more urgent than) the victim's (default 2); and
  ``min_run_tokens`` -- a request is not preempted before it has generated this
  many tokens since it was last (re)admitted (default None = its current
  level's quantum: time-slice semantics, preemption only at quantum
  boundaries), so every recompute is paid for by that much progress.
  ``preempt_level_gap=1, min_run_tokens=0`` is FastServe's unguarded
  iteration-level preemption (with recompute it loses 35-40% throughput to FIFO
  on the task-suite lengths; see docs/scheduling.md).
- Starvation: a request that has not run for ``starvation_s`` (since it arrived
  or was last scheduled) is promoted to level 0 with its attained count reset,
  and holds the line for an adapter slot.
- Waiting order is (level, arrival); KV preemption victim = lowest priority.
"""

from __future__ import annotations

from collections.abc import Sequence

from inlaid.core.policies import Policy
from inlaid.request import Request


class MlfqPolicy(Policy):
    """Skip-join MLFQ (FastServe) with priority preemption and starvation promotion."""

    name = "mlfq"
    preempts_for_priority = True

    def __init__(self, num_levels: int = 6, base_quantum: int = 8, prefill_tokens_per_quantum: float = 64.0,
                 starvation_s: float = 10.0, priority_preemption: bool = True, preempt_level_gap: int = 2,
                 min_run_tokens: int | None = None) -> None:
        if num_levels < 1 or base_quantum < 1 or prefill_tokens_per_quantum <= 0 or starvation_s <= 0:
            raise ValueError("MlfqPolicy needs num_levels >= 1, base_quantum >= 1, "
                             "prefill_tokens_per_quantum > 0 and starvation_s > 0")
        if preempt_level_gap < 1 or (min_run_tokens is not None and min_run_tokens < 0):
            raise ValueError(f"MlfqPolicy needs preempt_level_gap >= 1 (got {preempt_level_gap}) and "
                             f"min_run_tokens >= 0 (got {min_run_tokens})")
        self.num_levels = num_levels
        self.base_quantum = base_quantum
        self.prefill_tokens_per_quantum = prefill_tokens_per_quantum
        self.starvation_s = starvation_s
        self.preempts_for_priority = priority_preemption
        self.preempt_level_gap = preempt_level_gap
        self.min_run_tokens = min_run_tokens
        """None: the victim's current level's quantum."""
        self._run_tokens: dict[str, int] = {}
        """Output tokens generated since the request was last (re)admitted."""
        self.level: dict[str, int] = {}
        self._attained: dict[str, int] = {}
        self._seen_outputs: dict[str, int] = {}
        self._last_run: dict[str, float] = {}
        self.promotions = 0
        """Starvation promotions so far."""

    def quantum(self, level: int) -> int:
        return self.base_quantum * 2**level

    def entry_level(self, req: Request) -> int:
        """Skip-join: the first level whose quantum covers the prefill cost."""
        cost = req.num_prompt_tokens / self.prefill_tokens_per_quantum
        for lvl in range(self.num_levels):
            if self.quantum(lvl) >= cost:
                return lvl
        return self.num_levels - 1

    def on_add(self, req: Request, now: float) -> None:
        self.level[req.request_id] = self.entry_level(req)
        self._attained[req.request_id] = 0
        self._seen_outputs[req.request_id] = req.num_output_tokens
        self._last_run[req.request_id] = now
        self._run_tokens[req.request_id] = 0

    def _starving(self, req: Request, now: float) -> bool:
        return now - self._last_run.get(req.request_id, req.arrival_time) > self.starvation_s

    def _key(self, req: Request) -> tuple[int, float]:
        return self.level.get(req.request_id, 0), req.arrival_time

    def order_waiting(self, waiting: Sequence[Request], now: float) -> list[Request]:
        for req in waiting:
            if self._starving(req, now) and self.level.get(req.request_id, 0) > 0:
                self.level[req.request_id] = 0
                self._attained[req.request_id] = 0
                self.promotions += 1
        return sorted(waiting, key=self._key)

    def holds_line(self, req: Request, now: float) -> bool:
        return self._starving(req, now)

    def outranks(self, waiting: Request, running: Request) -> bool:
        victim_level = self.level.get(running.request_id, 0)
        if victim_level - self.level.get(waiting.request_id, 0) < self.preempt_level_gap:
            return False
        need = self.quantum(victim_level) if self.min_run_tokens is None else self.min_run_tokens
        return self._run_tokens.get(running.request_id, 0) >= need

    def pick_victim(self, candidates: Sequence[Request]) -> Request:
        return max(candidates, key=self._key)

    def on_step(self, scheduled: Sequence[Request], now: float) -> None:
        for req in scheduled:
            rid = req.request_id
            if rid not in self.level:
                continue
            self._last_run[rid] = now
            gained = req.num_output_tokens - self._seen_outputs.get(rid, 0)
            self._seen_outputs[rid] = req.num_output_tokens
            self._attained[rid] = self._attained.get(rid, 0) + gained
            self._run_tokens[rid] = self._run_tokens.get(rid, 0) + gained
            lvl = self.level[rid]
            if self._attained[rid] >= self.quantum(lvl) and lvl < self.num_levels - 1:
                self.level[rid] = lvl + 1
                self._attained[rid] = 0

    def on_preempt(self, req: Request, now: float) -> None:
        self._last_run[req.request_id] = now
        self._run_tokens[req.request_id] = 0

    def on_finish(self, req: Request) -> None:
        for table in (self.level, self._attained, self._seen_outputs, self._last_run, self._run_tokens):
            table.pop(req.request_id, None)
