"""Step-cost model of one engine step, and its least-squares fit from measurements.

Owns: ``StepCostModel`` (coefficients, seconds) and ``fit_cost_model``.

Model: ``t = base + prefill_token * P + decode_seq * D + distinct_adapter * A + adapter_load * L``
where P = prefill tokens in the step, D = decode sequences, A = distinct
(non-base) adapters in the step, L = adapters copied into device slots before the
step. Coefficients are fitted from engine measurements (``fit_cost_model``); the
defaults are a placeholder of 7B-on-one-GPU magnitude until a fit replaces them.

Also: ``r_squared`` (fit quality), JSON save/load of a fitted model with its
metadata (device, R², sample count), and ``gpu_like_cost_model`` (an *assumed*
GPU model whose adapter-load term is host->device copy time = adapter bytes /
link bandwidth), used until a GPU fit replaces it.

Invariants: pure Python (no torch, no numpy); times are seconds; every
coefficient is >= 0 after a fit (negative fitted values are clipped to 0).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, astuple, dataclass, fields
from pathlib import Path
from typing import Any

from inlaid.core.linsolve import SingularSystem, solve
from inlaid.core.outputs import SchedulerOutput

NUM_FEATURES = 5
"""Length of ``StepCostModel.features`` (the linear, least-squares-fitted part)."""
OPTIONAL_COEFFICIENTS = frozenset({"prefill_step"})
"""Coefficients a cost-model file may omit (0 then): files written before they existed."""


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
    prefill_step: float = 0.0
    """Extra fixed cost of a step that has any prefill tokens (CUDA: decode replays a captured graph,
    prefill runs eagerly). Not one of ``features`` (``fit_cost_model`` leaves it 0); fitted from a
    serving run by ``inlaid.sim.serving_replay``."""

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
        """Seconds of a step with ``features`` (+ ``prefill_step`` when it has prefill tokens)."""
        linear = sum(c * x for c, x in zip(astuple(self), feats[:NUM_FEATURES]))
        return linear + (self.prefill_step if len(feats) > 1 and feats[1] > 0 else 0.0)

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


def _lstsq(samples: Sequence[tuple[Sequence[float], float]], active: list[int], ridge: float) -> list[float]:
    """Least squares over the ``active`` feature indices (others fixed at 0)."""
    ata = [[sum(x[i] * x[j] for x, _ in samples) + (ridge if i == j else 0.0) for j in active] for i in active]
    atb = [sum(x[i] * y for x, y in samples) for i in active]
    scale = max(abs(ata[i][i]) for i in range(len(active))) or 1.0
    try:
        return solve(ata, atb, tol=1e-12 * scale)
    except SingularSystem as e:
        raise ValueError(f"cost-model fit is singular: feature {e.column} never varies in the samples") from e


def fit_cost_model(samples: Sequence[tuple[Sequence[float], float]], ridge: float = 0.0) -> StepCostModel:
    """Non-negative least-squares fit of the coefficients from (features, measured seconds) samples.

    ``features`` are ``StepCostModel.features`` vectors (5 values, the first 1.0).
    A coefficient that comes out negative is fixed at 0 and the rest refitted
    (active-set NNLS), so the others are not biased by a clipped one.
    Features that never vary make the fit singular: a ``ValueError`` says which.
    """
    k = NUM_FEATURES
    if len(samples) < k:
        raise ValueError(f"need at least {k} samples to fit {k} coefficients, got {len(samples)}")
    for x, _ in samples:
        if len(x) != k:
            raise ValueError(f"each sample needs {k} features, got {len(x)}")
    names = [f.name for f in fields(StepCostModel)][:k]
    for i in range(1, k):
        if all(x[i] == 0 for x, _ in samples):
            raise ValueError(f"cost-model fit is singular: feature {names[i]!r} is 0 in every sample; "
                             "measure steps that exercise it")
    active = list(range(k))
    while True:
        coef = _lstsq(samples, active, ridge)
        worst = min(range(len(active)), key=lambda j: coef[j])
        if coef[worst] >= 0 or len(active) == 1:
            break
        del active[worst]
    full = [0.0] * k
    for j, i in enumerate(active):
        full[i] = max(coef[j], 0.0)
    return StepCostModel(*full)


def r_squared(model: StepCostModel, samples: Sequence[tuple[Sequence[float], float]]) -> float:
    """Coefficient of determination of ``model`` on (features, seconds) samples."""
    ys = [y for _, y in samples]
    if not ys:
        raise ValueError("r_squared needs at least one sample")
    mean = sum(ys) / len(ys)
    ss_tot = sum((y - mean) ** 2 for y in ys)
    ss_res = sum((y - model.cost(x)) ** 2 for x, y in samples)
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def cost_model_to_json(model: StepCostModel, meta: Mapping[str, Any] | None = None) -> str:
    """``{"coefficients": {...}, **meta}`` as indented JSON."""
    return json.dumps({"coefficients": asdict(model), **(meta or {})}, indent=2, sort_keys=True) + "\n"


def load_cost_model(path: str | Path) -> tuple[StepCostModel, dict[str, Any]]:
    """A fitted model and its metadata from a file written by ``cost_model_to_json``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ValueError(f"cost-model file {path} not found; run benchmarks/fit_cost_model.py first") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"cost-model file {path} is not valid JSON: {exc}") from exc
    coef = data.get("coefficients") if isinstance(data, dict) else None
    names = {f.name for f in fields(StepCostModel)}
    if not isinstance(coef, dict) or not names - OPTIONAL_COEFFICIENTS <= set(coef) <= names:
        raise ValueError(f"cost-model file {path} needs a 'coefficients' object with the keys "
                         f"{sorted(names - OPTIONAL_COEFFICIENTS)} (optional: {sorted(OPTIONAL_COEFFICIENTS)})")
    meta = {k: v for k, v in data.items() if k != "coefficients"}
    return StepCostModel(**{k: float(v) for k, v in coef.items()}), meta


def gpu_like_cost_model(adapter_bytes: float, link_gb_s: float = 12.0, base: float = 0.020,
                        prefill_token: float = 6.0e-5, decode_seq: float = 1.2e-4,
                        distinct_adapter: float = 4.0e-4) -> StepCostModel:
    """An ASSUMED 7B-on-one-GPU step model: batching nearly free, adapter load = bytes / link bandwidth.

    Defaults: 20 ms per step (weights read once), 60 us per prefill token, 120 us
    per decode sequence, 0.4 ms per distinct adapter (one LoRA kernel segment),
    ``link_gb_s`` GB/s effective host->device copy (pageable PCIe 4.0 x16).
    """
    if adapter_bytes <= 0 or link_gb_s <= 0:
        raise ValueError(f"adapter_bytes and link_gb_s must be > 0, got {adapter_bytes}, {link_gb_s}")
    return StepCostModel(base=base, prefill_token=prefill_token, decode_seq=decode_seq,
                         distinct_adapter=distinct_adapter, adapter_load=adapter_bytes / (link_gb_s * 1e9))
