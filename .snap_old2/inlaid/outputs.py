"""RequestOutput: what the engine returns to callers (LLM.generate, AsyncLLM, server).

Invariants: ``text`` and ``token_ids`` are cumulative (everything generated so
far); ``delta_text`` / ``delta_token_ids`` are what this step added, so a stream
is the concatenation of the deltas. Stop strings are never part of ``text``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    """Progress of one request after an engine step."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    """"stop" | "length" | "abort" | "error" once finished."""
    adapter: str | None = None
    error: str | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)
