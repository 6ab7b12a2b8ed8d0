import random

import pytest

from inlaid.sim.cost_model import (StepCostModel, _lstsq, cost_model_to_json, fit_cost_model, gpu_like_cost_model,
                                   load_cost_model, r_squared)


def _samples(true_coef, n=80, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        x = [1.0, float(rng.randint(0, 600)), float(rng.randint(1, 32)), float(rng.randint(0, 8)),
             float(rng.randint(0, 3))]
        out.append((x, sum(c * v for c, v in zip(true_coef, x)) * (1 + rng.uniform(-0.02, 0.02))))
    return out


def test_nnls_fixes_a_negative_coefficient_at_zero_and_refits_the_rest():
    samples = _samples([0.01, 1e-4, 3e-4, -1e-3, 5e-3])  # a true negative per-adapter effect
    fit = fit_cost_model(samples)
    assert fit.distinct_adapter == 0.0
    ref = _lstsq(samples, [0, 1, 2, 4], 0.0)  # least squares without that feature
    assert [fit.base, fit.prefill_token, fit.decode_seq, fit.adapter_load] == pytest.approx(ref)
    assert all(v >= 0 for v in (fit.base, fit.prefill_token, fit.decode_seq, fit.adapter_load))


def test_r_squared():
    true = StepCostModel(base=0.01, prefill_token=1e-4, decode_seq=3e-4, distinct_adapter=1e-3, adapter_load=5e-3)
    samples = [(x, true.cost(x)) for x, _ in _samples([0.0] * 5)]
    assert r_squared(true, samples) == pytest.approx(1.0)
    mean = sum(y for _, y in samples) / len(samples)
    flat = StepCostModel(base=mean, prefill_token=0, decode_seq=0, distinct_adapter=0, adapter_load=0)
    assert r_squared(flat, samples) == pytest.approx(0.0, abs=1e-9)
    assert r_squared(fit_cost_model(samples), samples) > 0.999


def test_json_round_trip_and_errors(tmp_path):
    model = StepCostModel(base=0.5, prefill_token=0.01, decode_seq=0.02, distinct_adapter=0.0, adapter_load=0.003)
    f = tmp_path / "cm.json"
    f.write_text(cost_model_to_json(model, {"device": "cpu", "r2": 0.9}))
    back, meta = load_cost_model(f)
    assert back == model and meta == {"device": "cpu", "r2": 0.9}
    with pytest.raises(ValueError, match="not found"):
        load_cost_model(tmp_path / "missing.json")
    f.write_text('{"coefficients": {"base": 1}}')
    with pytest.raises(ValueError, match="needs a 'coefficients' object with the keys"):
        load_cost_model(f)
    f.write_text('{"coefficients": {"base": 1, "prefill_token": 0, "decode_seq": 0, "distinct_adapter": 0, '
                 '"adapter_load": 0, "bogus": 1}}')
    with pytest.raises(ValueError, match="needs a 'coefficients' object"):
        load_cost_model(f)
    f.write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_cost_model(f)


def test_gpu_like_adapter_load_is_bytes_over_bandwidth():
    m = gpu_like_cost_model(80e6, link_gb_s=10.0)
    assert m.adapter_load == pytest.approx(8e-3)
    assert gpu_like_cost_model(160e6, link_gb_s=10.0).adapter_load == pytest.approx(2 * m.adapter_load)
    with pytest.raises(ValueError):
        gpu_like_cost_model(0)


def test_prefill_step_is_optional_in_files_and_charged_once_per_prefill_step(tmp_path):
    f = tmp_path / "old.json"  # a file written before prefill_step existed
    f.write_text('{"coefficients": {"base": 0.01, "prefill_token": 0.001, "decode_seq": 0.0, '
                 '"distinct_adapter": 0.0, "adapter_load": 0.0}}')
    old, _ = load_cost_model(f)
    assert old.prefill_step == 0.0
    m = StepCostModel(base=0.01, prefill_token=0.001, decode_seq=0.0, distinct_adapter=0.0, adapter_load=0.0,
                      prefill_step=0.09)
    assert m.cost([1.0, 10.0, 3.0, 1.0, 0.0]) == pytest.approx(0.01 + 0.01 + 0.09)
    assert m.cost([1.0, 0.0, 3.0, 1.0, 0.0]) == pytest.approx(0.01)  # decode-only: no prefill overhead
    assert m.isolated_time(100, 3, chunk=64) == pytest.approx(2 * (0.01 + 0.09) + 0.1 + 2 * 0.01)
    f.write_text(cost_model_to_json(m))
    assert load_cost_model(f)[0] == m
