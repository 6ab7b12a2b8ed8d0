"""SamplingParams: how one request is decoded. Validated at construction.

Invariants: every field is checked in ``__post_init__``; an invalid value raises
``ValueError`` naming the field, so a bad request fails at the edge and never
reaches the engine. Pure Python (no torch), usable from ``core/``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """Decoding parameters of one request (the OpenAI / vLLM names)."""

    max_tokens: int = 16
    """Most tokens to generate (>= 1)."""
    temperature: float = 0.0
    """0 means greedy; > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    top_k: int = -1
    """Keep only the k most likely tokens; -1 (or 0) disables."""
    seed: int | None = None
    """Per-request RNG seed, so sampled outputs are reproducible."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; the stop string is not included in the text."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end generation (besides EOS)."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 0, got {self.top_k!r}")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """True when decoding takes the argmax (temperature 0)."""
        return self.temperature == 0.0

