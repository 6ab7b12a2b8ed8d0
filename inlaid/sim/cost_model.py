"""Step-cost model of one engine step, and its least-squares fit from measurements.

Owns: ``StepCostModel`` (coefficients, seconds) and ``fit_cost_model``.

Model: ``t = base + prefill_token * P + decode_seq * D + distinct_adapter * A + adapter_load * L``
where P = prefill tokens in the step, D = decode sequences, A = distinct
(non-base) adapters in the step, L = adapters copied into device slots before the
step. Coefficients are fitted from engine measurements (``fit_cost_model``); the
defaults are a placeholder of 7B-on-one-GPU magnitude until a fit replaces them.

Invariants: pure Python (no torch, no numpy); times are seconds; every
coefficient is >= 0 after a fit (negative fitted values are clipped to 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields

from inlaid.core.outputs import SchedulerOutput


@dataclass(frozen=True)
class StepCostModel:
    """Seconds per step as a linear function of the step's features."""

    base: float = 0.012
    """Fixed cost of one step (weights read once per forward)."""
    prefill_token: float = 0.00012
    """Per prefill (or recompute) token."""
    decode_seq: float = 0.00025
    """Per decoding sequence (KV reads, sampling)."""
    distinct_adapter: float = 0.0008
    """Per distinct adapter in the step (LoRA kernel segments)."""
    adapter_load: float = 0.006
    """Per adapter copied host -> device before the step."""

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"cost coefficient {f.name} must be >= 0, got {getattr(self, f.name)}")

    @staticmethod
    def features(out: SchedulerOutput) -> list[float]:
        """[1, prefill tokens, decode seqs, distinct adapters, adapter loads] of a step."""
        prefill = sum(len(s.token_ids) for s in out.scheduled if s.is_prefill)
        decode = sum(1 for s in out.scheduled if not s.is_prefill)
        distinct = len({s.adapter_slot for s in out.scheduled if s.adapter_slot >= 0})
        return [1.0, float(prefill), float(decode), float(distinct), float(len(out.adapter_loads))]

    def cost(self, feats: Sequence[float]) -> float:
        return sum(c * x for c, x in zip(astuple(self), feats))

    def step_time(self, out: SchedulerOutput) -> float:
        """Predicted seconds for the step ``out``."""
        return self.cost(self.features(out))

    def isolated_time(self, prompt_len: int, output_len: int, chunk: int = 2048, with_adapter: bool = True) -> float:
        """Seconds to serve one request alone (prefill chunks, then one decode step per further token)."""
        a = 1.0 if with_adapter else 0.0
        t = 0.0
        left = prompt_len
        while left > 0:
            n = min(chunk, left)
            t += self.cost([1.0, float(n), 0.0, a, 0.0])
            left -= n
        return t + max(output_len - 1, 0) * self.cost([1.0, 0.0, 1.0, a, 0.0])


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve the square system a x = b by Gaussian elimination with partial pivoting."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    scale = max(abs(a[i][i]) for i in range(n)) or 1.0
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[piv][col]) < 1e-12 * scale:
            raise ValueError(f"cost-model fit is singular: feature {col} never varies in the samples")
        m[col], m[piv] = m[piv], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] for i in range(n)]


def fit_cost_model(samples: Sequence[tuple[Sequence[float], float]], ridge: float = 0.0) -> StepCostModel:
    """Least-squares fit of the coefficients from (features, measured seconds) samples.

    ``features`` are ``StepCostModel.features`` vectors (5 values, the first 1.0).
    Features that never vary make the fit singular: a ``ValueError`` says which.
    """
    k = len(fields(StepCostModel))
    if len(samples) < k:
        raise ValueError(f"need at least {k} samples to fit {k} coefficients, got {len(samples)}")
    for x, _ in samples:
        if len(x) != k:
            raise ValueError(f"each sample needs {k} features, got {len(x)}")
    names = [f.name for f in fields(StepCostModel)]
    for i in range(1, k):
        if all(x[i] == 0 for x, _ in samples):
            raise ValueError(f"cost-model fit is singular: feature {names[i]!r} is 0 in every sample; "
                             "measure steps that exercise it")
    ata = [[sum(x[i] * x[j] for x, _ in samples) + (ridge if i == j else 0.0) for j in range(k)] for i in range(k)]
    atb = [sum(x[i] * y for x, y in samples) for i in range(k)]
    coef = _solve(ata, atb)
    return StepCostModel(*[max(c, 0.0) for c in coef])
