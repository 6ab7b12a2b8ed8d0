"""gptq_quantize_many / split_rows against the single-matrix GPTQ reference, and the calibration input tap."""

from __future__ import annotations

import pytest
import torch

from inlaid.quant.gptq import gptq_quantize, output_error
from inlaid.quant.gptq_batched import gptq_quantize_many, split_rows
from inlaid.quant.rtn import rtn_quantize


def _hessian(n_in: int, seed: int, rows: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows * n_in, n_in, generator=g) * (torch.rand(n_in, generator=g) * 3 + 0.1)
    return 2.0 / x.shape[0] * x.t() @ x


@pytest.mark.parametrize("n_out,n_in,gs,bits,sym", [(24, 96, 32, 4, True), (20, 200, 64, 3, False),
                                                    (16, 64, -1, 4, True), (8, 160, 128, 2, True)])
def test_many_equals_single_per_hessian(n_out: int, n_in: int, gs: int, bits: int, sym: bool) -> None:
    w = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(1))
    hs = torch.stack([_hessian(n_in, s) for s in range(3)])
    hs[2, 5, :] = 0.0  # a dead input column in one item only
    hs[2, :, 5] = 0.0
    many = gptq_quantize_many(w, hs, bits, gs, sym)
    assert len(many) == 3
    for h, got in zip(hs, many):
        ref = gptq_quantize(w, h, bits, gs, sym)
        assert torch.equal(got.qweight, ref.qweight)
        assert torch.equal(got.scales, ref.scales) and torch.equal(got.zeros, ref.zeros)
        assert torch.equal(got.g_idx, ref.g_idx)
        assert torch.allclose(got.weight, ref.weight, atol=0, rtol=0)
        assert got.loss == pytest.approx(ref.loss, rel=1e-5)
        assert got.damp == pytest.approx(ref.damp, rel=1e-6)
        assert torch.allclose(got.dequantize(), got.weight, atol=1e-6)


def test_each_item_beats_rtn_on_its_own_hessian() -> None:
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    hs = torch.stack([_hessian(128, s) for s in (3, 4)])
    rtn = rtn_quantize(w, 3, 32)
    for h, got in zip(hs, gptq_quantize_many(w, hs, 3, 32)):
        assert output_error(w, got.weight, h) < output_error(w, rtn.weight, h)


def test_indefinite_item_is_damped_alone() -> None:
    h_ok = _hessian(64, 5)
    h_bad = h_ok.clone()
    h_bad[0, 1] = h_bad[1, 0] = 10 * float(h_bad.diag().max())  # indefinite
    w = torch.randn(8, 64)
    ok, bad = gptq_quantize_many(w, torch.stack([h_ok, h_bad]), 4, 32, percdamp=0.01)
    assert ok.damp == pytest.approx(0.01 * float(h_ok.diag().mean()), rel=1e-5)
    assert bad.damp > 0.01 * float(h_bad.diag().mean()) * 5
    assert torch.isfinite(bad.weight).all()


def test_split_rows_equals_quantizing_each_weight() -> None:
    g = torch.Generator().manual_seed(6)
    ws = [torch.randn(n, 96, generator=g) for n in (16, 8, 8)]
    h = _hessian(96, 7)
    (stacked,) = gptq_quantize_many(torch.cat(ws), h[None], 4, 32)
    for w, part in zip(ws, split_rows(stacked, [16, 8, 8])):
        ref = gptq_quantize(w, h, 4, 32)
        assert torch.equal(part.qweight, ref.qweight) and torch.equal(part.scales, ref.scales)
    with pytest.raises(ValueError, match="add up"):
        split_rows(stacked, [16, 8])


def test_bad_input_names_the_problem() -> None:
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match=r"\[B, 64, 64\]"):
        gptq_quantize_many(w, torch.eye(32)[None], 4, 32)
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize_many(w, torch.eye(64)[None], 5, 32)
    nan = torch.eye(64)[None].clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize_many(w, nan, 4, 32)


def test_input_tap_sees_calls_and_is_removed() -> None:
    from inlaid.model.layers import ParallelLinear
    from inlaid.quant.calibrate import _InputTap
    from inlaid.quant.hessian import HessianAccumulator

    lin = ParallelLinear(16, 8, False, "column")
    torch.nn.init.normal_(lin.weight)  # created with torch.empty: leftover NaNs would make torch.equal fail
    acc = HessianAccumulator(16)
    tap = _InputTap(lin, acc)
    x = torch.randn(5, 16)
    y = lin(x)
    assert acc.n_samples == 5 and torch.allclose(acc.hessian, 2.0 / 5 * x.t() @ x, atol=1e-6)
    tap.remove()
    assert torch.equal(lin(x), y) and acc.n_samples == 5
    assert "apply" not in vars(lin.quant_method)
