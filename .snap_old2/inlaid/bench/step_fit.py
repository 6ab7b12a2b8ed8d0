"""A step-cost model fitted directly to the step logs of engine-driver runs (``inlaid.bench.step_log``).

Owns ``step_samples`` (a run's step log -> (features, seconds) per step that did work), ``fit_step_costs``
(non-negative least squares of ``StepCostModel``'s five linear coefficients AND its ``prefill_step`` term, by
active set: a coefficient that comes out negative is fixed at 0 and the rest refitted), ``r_squared`` and
``main`` (fit the runs matching a glob, write a cost-model JSON the simulator, the scheduling study and
``sim_predict`` read).

Why: the session-3 GPU model was grid-fitted to per-request timelines (no step logs then) and has no
prefill-token term; a step log gives every step's features and measured time, so a direct fit replaces the
grid. Features per step: [1, prefill tokens, decode sequences, distinct adapters, adapter loads, 1 if the step
prefills]; seconds: the step's measured time (what the replay clock advances by). Pure Python.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inlaid.core.linsolve import SingularSystem, solve
from inlaid.sim.cost_model import StepCostModel, cost_model_to_json

NAMES = ("base", "prefill_token", "decode_seq", "distinct_adapter", "adapter_load", "prefill_step")
Sample = tuple[list[float], float]


def step_samples(log: dict[str, Any]) -> list[Sample]:
    """(features, seconds) of every step of ``log`` that scheduled work."""
    out = []
    for row in log["rows"]:
        r = dict(zip(log["columns"], row, strict=True))
        if r["prefill_seqs"] or r["decode_seqs"]:
            out.append(([1.0, float(r["prefill_tokens"]), float(r["decode_seqs"]), float(r["distinct_adapters"]),
                         float(r["adapter_loads"]), 1.0 if r["prefill_seqs"] else 0.0], float(r["step_s"])))
    return out


def _lstsq(samples: Sequence[Sample], active: list[int]) -> list[float]:
    ata = [[sum(x[i] * x[j] for x, _ in samples) for j in active] for i in active]
    atb = [sum(x[i] * y for x, y in samples) for i in active]
    scale = max(abs(ata[i][i]) for i in range(len(active))) or 1.0
    try:
        return solve(ata, atb, tol=1e-12 * scale)
    except SingularSystem as e:
        raise ValueError(f"step-cost fit is singular: {NAMES[active[e.column]]!r} does not vary independently "
                         "in these steps; fit on runs that exercise it") from e


def fit_step_costs(samples: Sequence[Sample]) -> StepCostModel:
    """Non-negative least squares of the six coefficients (``NAMES``) on ``samples``."""
    if len(samples) < len(NAMES):
        raise ValueError(f"need at least {len(NAMES)} steps to fit {len(NAMES)} coefficients, got {len(samples)}")
    active = [i for i in range(len(NAMES)) if i == 0 or any(x[i] for x, _ in samples)]  # absent features: 0
    while True:
        coef = _lstsq(samples, active)
        worst = min(range(len(active)), key=lambda j: coef[j])
        if coef[worst] >= 0 or len(active) == 1:
            break
        del active[worst]
    full = dict.fromkeys(NAMES, 0.0)
    for j, i in enumerate(active):
        full[NAMES[i]] = max(coef[j], 0.0)
    return StepCostModel(**full)


def r_squared(model: StepCostModel, samples: Sequence[Sample]) -> float:
    """Share of the step-time variance the model explains."""
    ys = [y for _, y in samples]
    mean = sum(ys) / len(ys)
    tot = sum((y - mean) ** 2 for y in ys) or 1e-30
    return 1.0 - sum((model.cost(x[:5]) - y) ** 2 for x, y in samples) / tot  # cost adds prefill_step when P > 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="fit a step-cost model to engine-driver runs' step logs")
    ap.add_argument("runs", nargs="+", help="run JSONs or globs (policy_sweep results with a step_log)")
    ap.add_argument("--device", default="?", help="recorded as the model's device")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    paths = sorted({p for g in a.runs for p in glob.glob(g)})
    samples: list[Sample] = []
    used = []
    for p in paths:
        d = json.loads(Path(p).read_text())
        if d.get("step_log"):
            samples += step_samples(d["step_log"])
            used.append(Path(p).name)
    if not samples:
        raise ValueError(f"no step log in {len(paths)} files matching {a.runs}")
    model = fit_step_costs(samples)
    meta = {"device": a.device, "method": "non-negative least squares on step logs (inlaid.bench.step_fit)",
            "samples": len(samples), "r_squared": r_squared(model, samples), "fitted_on": used,
            "command": "PYTHONPATH=. python -m inlaid.bench.step_fit " + " ".join(sys.argv[1:] if argv is None else argv)}
    a.out.write_text(cost_model_to_json(model, meta))
    sys.stdout.write(f"{model} R^2 {meta['r_squared']:.3f} over {len(samples)} steps of {len(used)} runs\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
