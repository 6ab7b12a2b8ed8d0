"""inlaid.bench.step_fit: a step-cost model fitted to step logs recovers known coefficients."""

from __future__ import annotations

import json
import random

import pytest

from inlaid.bench.step_fit import fit_step_costs, main, r_squared, step_samples
from inlaid.bench.step_log import COLUMNS
from inlaid.sim.cost_model import StepCostModel, load_cost_model

TRUE = StepCostModel(base=0.004, prefill_token=2e-5, decode_seq=3e-4, distinct_adapter=1.5e-3, adapter_load=0.012,
                     prefill_step=0.1)


def _log(n: int, seed: int, noise: float = 0.0) -> dict:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        pre = rng.random() < 0.3
        row = {"t_end": 0.0, "exec_s": 0.0, "sched_s": 0.0, "prefill_seqs": rng.randint(1, 20) if pre else 0,
               "decode_seqs": rng.randint(0 if pre else 1, 60), "prefill_tokens": rng.randint(16, 2000) if pre else 0,
               "distinct_adapters": rng.randint(1, 16), "adapter_loads": rng.randint(0, 3), "preemptions": 0,
               "waiting": 0, "running": 0}
        feats = [1.0, row["prefill_tokens"], row["decode_seqs"], row["distinct_adapters"], row["adapter_loads"]]
        row["step_s"] = TRUE.cost(feats) * (1.0 + noise * rng.uniform(-1, 1))
        rows.append([row[c] for c in COLUMNS])
    rows.append([0.0] * len(COLUMNS))  # an empty step: not a sample
    return {"columns": list(COLUMNS), "rows": rows}


def test_fit_recovers_the_coefficients_and_prefill_step() -> None:
    samples = step_samples(_log(300, 1))
    assert len(samples) == 300
    model = fit_step_costs(samples)
    for name in ("base", "prefill_token", "decode_seq", "distinct_adapter", "adapter_load", "prefill_step"):
        assert getattr(model, name) == pytest.approx(getattr(TRUE, name), rel=1e-6, abs=1e-9), name
    assert r_squared(model, samples) == pytest.approx(1.0)
    noisy = step_samples(_log(400, 2, noise=0.1))
    m = fit_step_costs(noisy)
    assert m.prefill_step == pytest.approx(0.1, rel=0.1) and m.distinct_adapter == pytest.approx(1.5e-3, rel=0.2)
    assert 0.9 < r_squared(m, noisy) < 1.0  # +-10% noise: most, not all, of the variance explained


def test_negative_coefficients_are_fixed_at_zero_and_absent_features_left_out() -> None:
    log = _log(200, 3)
    cols = log["columns"]
    for row in log["rows"]:  # no adapter loads anywhere, and decode steps that get cheaper with more sequences
        row[cols.index("adapter_loads")] = 0
        if not row[cols.index("prefill_seqs")]:
            row[cols.index("step_s")] -= 1e-5 * row[cols.index("decode_seqs")]
    model = fit_step_costs(step_samples(log))
    assert model.adapter_load == 0.0 and model.decode_seq >= 0.0
    with pytest.raises(ValueError, match="need at least 6 steps"):
        fit_step_costs(step_samples(_log(3, 4)))


def test_command_line_writes_a_loadable_cost_model(tmp_path) -> None:
    for i in range(2):
        (tmp_path / f"run{i}.json").write_text(json.dumps({"config": {}, "step_log": _log(100, 10 + i)}))
    (tmp_path / "old.json").write_text(json.dumps({"config": {}}))  # no step log: skipped
    out = tmp_path / "cm.json"
    assert main([str(tmp_path / "*.json"), "--device", "test", "--out", str(out)]) == 0
    model, meta = load_cost_model(out)
    assert meta["samples"] == 200 and meta["fitted_on"] == ["run0.json", "run1.json"]
    assert model.prefill_step == pytest.approx(0.1, rel=1e-6) and meta["r_squared"] == pytest.approx(1.0)
