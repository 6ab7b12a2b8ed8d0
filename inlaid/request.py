"""Request and RequestStatus: one generation request as the scheduler sees it.

Invariants:
- Pure Python (no torch): ``core/`` schedules these objects.
- ``num_computed_tokens`` counts tokens of ``all_token_ids`` whose KV is in the
  cache; it only grows, except on preemption (recompute), where it drops to 0.
- ``output_token_ids`` only grows; tokens are appended by ``Scheduler.update``.
- The adapter name doubles as the task identity for length prediction and grouping
  (None = base model only).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from inlaid.sampling import SamplingParams


class RequestStatus(enum.Enum):
    """Lifecycle: WAITING -> RUNNING -> (PREEMPTED -> WAITING ->) FINISHED_*."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        # a set lookup: asked several times per request per step (``.name`` goes through enum's descriptor)
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's finish_reason ("stop" | "length" | "abort" | "error"), or None while live."""
        return self.value if self.finished else None


_FINISHED = frozenset(s for s in RequestStatus if s.name.startswith("FINISHED"))


@dataclass(eq=False)
class Request:
    """One request: prompt tokens, decoding parameters, adapter, and progress."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    adapter: str | None = None
    eos_token_id: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    predicted_output_len: float | None = None
    """Set by the length predictor (inlaid policy); None until predicted."""
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    error: str | None = None
    """Why the request failed (status FINISHED_ERROR)."""

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("prompt is empty: give at least one token")

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def predicted_remaining(self) -> float:
        """Predicted output tokens still to generate (max_tokens bound when unpredicted)."""
        total = self.predicted_output_len
        if total is None:
            total = float(self.sampling_params.max_tokens)
        total = min(total, float(self.sampling_params.max_tokens))
        return max(total - self.num_output_tokens, 1.0)
