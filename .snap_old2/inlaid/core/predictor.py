"""Output-length prediction from per-task online statistics (first stage, before prefill).

Owns: running statistics of output lengths of finished requests, keyed by task
(the adapter name; None = base model) and by a prompt-length bucket.

Invariants:
- ``predict(req)`` never looks at the request's future: only its task, prompt
  length and ``max_tokens``; it sets ``req.predicted_output_len`` and returns it.
- ``observe(req)`` learns from a finished request's real output length.
- Cold start: with no observations a prediction falls back, through shrinkage
  (bucket -> task -> global -> prior), to ``prior_mean``; the result is always in
  ``[1, max_tokens]``.
- Pure Python, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from inlaid.request import Request


@dataclass
class _RunningMean:
    count: int = 0
    mean: float = 0.0

    def add(self, x: float) -> None:
        self.count += 1
        self.mean += (x - self.mean) / self.count


@dataclass
class LengthPredictor:
    """Per-task, prompt-length-conditioned online mean of output lengths with shrinkage."""

    prior_mean: float = 128.0
    """Predicted output length before anything has been observed."""
    shrinkage: float = 4.0
    """Pseudo-count pulling a sparse group's mean toward its parent (bucket -> task -> global -> prior)."""
    num_buckets: int = 12
    """Prompt lengths are bucketed by powers of two: [1], [2,3], [4,7], ... up to this many."""
    _bucket: dict[tuple[str | None, int], _RunningMean] = field(default_factory=dict, repr=False)
    _task: dict[str | None, _RunningMean] = field(default_factory=dict, repr=False)
    _global: _RunningMean = field(default_factory=_RunningMean, repr=False)

    def __post_init__(self) -> None:
        if self.prior_mean < 1:
            raise ValueError(f"prior_mean must be >= 1, got {self.prior_mean}")
        if self.shrinkage < 0:
            raise ValueError(f"shrinkage must be >= 0, got {self.shrinkage}")
        if self.num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got {self.num_buckets}")

    def bucket_of(self, prompt_len: int) -> int:
        """Power-of-two bucket of a prompt length."""
        return min(int(math.log2(max(prompt_len, 1))), self.num_buckets - 1)

    def _shrink(self, stat: _RunningMean | None, parent: float) -> float:
        if stat is None or stat.count == 0:
            return parent
        w = stat.count / (stat.count + self.shrinkage)
        return w * stat.mean + (1.0 - w) * parent

    def estimate(self, task: str | None, prompt_len: int) -> float:
        """Predicted total output length for a prompt of ``prompt_len`` tokens of ``task``."""
        g = self._shrink(self._global, self.prior_mean)
        t = self._shrink(self._task.get(task), g)
        return self._shrink(self._bucket.get((task, self.bucket_of(prompt_len))), t)

    def predict(self, req: Request) -> float:
        """Predict ``req``'s total output length, store it in ``req.predicted_output_len``, return it."""
        est = self.estimate(req.adapter, req.num_prompt_tokens)
        est = min(max(est, 1.0), float(req.sampling_params.max_tokens))
        req.predicted_output_len = est
        return est

    def observe(self, req: Request) -> None:
        """Learn from a finished request's real output length (ignored when it produced nothing)."""
        n = req.num_output_tokens
        if n < 1:
            return
        self._global.add(n)
        self._task.setdefault(req.adapter, _RunningMean()).add(n)
        key = (req.adapter, self.bucket_of(req.num_prompt_tokens))
        self._bucket.setdefault(key, _RunningMean()).add(n)

    def num_observed(self) -> int:
        """Finished requests observed so far (all tasks)."""
        return self._global.count

    def num_observed_task(self, task: str | None) -> int:
        """Finished requests of ``task`` observed so far."""
        stat = self._task.get(task)
        return stat.count if stat else 0
