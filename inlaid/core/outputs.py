"""The two messages of one engine step: SchedulerOutput (core -> worker) and
RunnerOutput (worker -> core).

Invariants:
- Plain ints, strings and lists only (no tensors): the scheduler stays pure
  Python and these messages can be broadcast to tensor-parallel workers.
- ``ScheduledSeq.token_ids`` are the tokens whose KV this step computes:
  ``all_token_ids[start_pos : start_pos + len(token_ids)]``.
- ``block_ids`` already hold room for ``start_pos + len(token_ids)`` tokens.
- ``adapter_loads`` are applied by the runner *before* the forward, so every
  ``adapter_slot`` in ``scheduled`` names a slot holding that adapter.
- An *ahead* output (``SchedulerOutput.ahead``, from ``Scheduler.schedule_ahead``) is planned before the
  previous step's tokens are known: its sequences are exactly the previous step's, in the same order, each
  one decode token whose id is that step's sampled token for the same request (``token_ids`` hold
  ``PENDING_TOKEN``; the runner takes the ids from the device).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from inlaid.sampling import SamplingParams

PENDING_TOKEN = -1
"""Stands for a token the previous step samples on the device (the input of an ahead step's sequence)."""


@dataclass
class ScheduledSeq:
    """One sequence's share of a step (a prefill chunk or one decode token)."""

    request_id: str
    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    adapter_slot: int
    """Device slot of the sequence's adapter, -1 for the base model only."""
    sample: bool
    """True when this step reaches the end of the known tokens, so a new token is sampled."""
    sampling_params: SamplingParams
    num_output_tokens: int = 0
    """Tokens generated so far (the sampler uses it to advance seeded RNGs deterministically)."""

    @property
    def is_prefill(self) -> bool:
        return len(self.token_ids) > 1 or self.start_pos == 0


@dataclass
class SchedulerOutput:
    """What the runner executes this step."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    adapter_loads: dict[int, str] = field(default_factory=dict)
    """slot -> adapter name to copy into that slot before the forward."""
    preempted_ids: list[str] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)
    """Requests freed since the last step; the runner drops their per-request state."""
    ahead: bool = False
    """Planned by ``Scheduler.schedule_ahead`` (see the module docstring)."""

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class RunnerOutput:
    """What the runner returns: one sampled token per sequence with ``sample=True``."""

    sampled: dict[str, int] = field(default_factory=dict)
    hidden_features: dict[str, list[float]] = field(default_factory=dict)
    """Optional per-request features (last hidden state summary) for the length probe."""
