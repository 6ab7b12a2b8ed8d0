"""GPTQ vs RTN on random matrices with correlated inputs; act-order, static groups, damping, bad input."""

from __future__ import annotations

import logging

import pytest
import torch

from inlaid.quant.gptq import find_params, gptq_quantize, output_error
from inlaid.quant.rtn import rtn_quantize

OUT, IN, TOKENS = 32, 128, 512


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, IN, generator=g) * 0.02
    mix = torch.randn(IN, IN, generator=g) / IN**0.5 + 0.3 * torch.eye(IN)
    scale = torch.linspace(0.2, 3.0, IN)  # uneven channel energies make act-order matter
    x = (torch.randn(TOKENS, IN, generator=g) @ mix) * scale
    return w, x, 2.0 / TOKENS * x.t() @ x


def _out_err(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.linalg.norm((w - wq).double() @ x.t().double()))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_beats_rtn_every_bit_width(bits: int, sym: bool) -> None:
    w, x, h = _problem()
    for gs in (-1, 32):
        q = gptq_quantize(w, h, bits, gs, sym=sym)
        r = rtn_quantize(w, bits, gs, sym=sym)
        e_gptq, e_rtn = _out_err(w, q.weight, x), _out_err(w, r.weight, x)
        assert e_gptq < 0.9 * e_rtn, (bits, gs, sym, e_gptq, e_rtn)
        # the trace form used by the quality study agrees with the direct norm
        assert output_error(w, q.weight, h) == pytest.approx(e_gptq**2 * 2 / TOKENS, rel=1e-4)


def test_committed_weight_matches_codes_and_grid() -> None:
    w, _, h = _problem(1)
    q = gptq_quantize(w, h, 3, 32, sym=False, act_order=True)
    assert torch.equal(q.dequantize(), q.weight)
    assert q.qweight.dtype == torch.uint8 and int(q.qweight.max()) <= 7
    assert torch.equal(q.scales.half().float(), q.scales)  # fp16-exact scales
    assert int(q.zeros.min()) >= 1 and int(q.zeros.max()) <= 7
    assert q.loss > 0 and q.damp == pytest.approx(0.01 * float(torch.diag(h).mean()))


def test_act_order_static_groups_g_idx() -> None:
    w, x, h = _problem(2)
    gs = 32
    q = gptq_quantize(w, h, 4, gs, sym=True, act_order=True, static_groups=True)
    assert q.perm is not None
    assert torch.equal(q.perm, torch.argsort(torch.diag(h), descending=True, stable=True))
    assert torch.equal(q.g_idx, (torch.arange(IN) // gs).to(torch.int32))
    # static groups: each group's grid comes from the original (unpermuted, un-updated) columns
    for g in range(IN // gs):
        scale, zero = find_params(w[:, g * gs : (g + 1) * gs], 4, True)
        assert torch.equal(q.scales[g], scale) and torch.equal(q.zeros[g], zero)
    assert torch.equal(q.dequantize(), q.weight)
    assert _out_err(w, q.weight, x) < _out_err(w, rtn_quantize(w, 4, gs).weight, x)


def test_act_order_without_static_groups_follows_permutation() -> None:
    w, _, h = _problem(3)
    gs = 32
    q = gptq_quantize(w, h, 4, gs, sym=False, act_order=True, static_groups=False)
    pos = torch.argsort(q.perm)  # processing position of each original column
    assert torch.equal(q.g_idx, (pos // gs).to(torch.int32))
    assert not torch.equal(q.g_idx, (torch.arange(IN) // gs).to(torch.int32))
    assert torch.bincount(q.g_idx.long()).tolist() == [gs] * (IN // gs)
    assert torch.equal(q.dequantize(), q.weight)


def test_dead_columns_quantize_to_zero_and_determinism() -> None:
    w, x, _ = _problem(4)
    x[:, :5] = 0.0
    h = 2.0 / TOKENS * x.t() @ x
    a = gptq_quantize(w, h, 4, 32, sym=False, act_order=True)
    b = gptq_quantize(w, h, 4, 32, sym=False, act_order=True)
    assert torch.equal(a.weight[:, :5], torch.zeros(OUT, 5))
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)
    assert torch.isfinite(a.weight).all()


def _indefinite(n: int, neg_fraction: float, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    qm, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    lam[0] = -neg_fraction * float(lam.mean())
    return (qm @ torch.diag(lam) @ qm.t()).float()


def test_non_pd_hessian_repaired_by_retry(caplog: pytest.LogCaptureFixture) -> None:
    h = _indefinite(IN, 0.5)
    mean = float(torch.diag(h).mean())
    eye = torch.eye(IN)
    assert int(torch.linalg.cholesky_ex(h + 0.01 * mean * eye)[1]) != 0  # default damping is not enough
    w, _, _ = _problem(5)
    with caplog.at_level(logging.WARNING, logger="inlaid.quant.gptq"):
        q = gptq_quantize(w, h, 4, 32)
    assert "not positive definite" in caplog.text
    assert q.damp > 0.01 * mean * 5 and torch.isfinite(q.weight).all()


def test_rank_deficient_with_zero_damping_retries() -> None:
    w, x, _ = _problem(6)
    x = x[:8]  # rank 8 << 128
    h = 2.0 / 8 * x.t() @ x
    q = gptq_quantize(w, h, 4, 32, percdamp=0.0)
    assert q.damp > 0 and torch.isfinite(q.weight).all()


def test_hopeless_hessian_raises_clearly() -> None:
    w, _, _ = _problem(7)
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize(w, _indefinite(IN, 50.0), 4, 32, max_retries=1)
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(w, torch.full((IN, IN), float("nan")), 4, 32)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 5}, "bits"),
        ({"group_size": 16}, "group_size"),
        ({"group_size": 96}, "group_size"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    w, _, h = _problem()
    args = {"bits": 4, "group_size": 32, **kwargs}
    with pytest.raises(ValueError, match=match):
        gptq_quantize(w, h, **args)
    with pytest.raises(ValueError, match=match):
        rtn_quantize(w, **args)


def test_shape_errors() -> None:
    w, _, h = _problem()
    with pytest.raises(ValueError, match="does not match in_features"):
        gptq_quantize(w, h[:64, :64], 4, 32)
    with pytest.raises(ValueError, match="2-D"):
        rtn_quantize(w[0], 4, 32)


def test_asymmetric_all_positive_group_uses_zero_one() -> None:
    w = torch.rand(4, 32) + 0.1  # every value positive: a plain zero point would round to 0
    r = rtn_quantize(w, 4, 32, sym=False)
    assert torch.equal(r.zeros, torch.ones_like(r.zeros))
    assert float((w - r.weight).abs().max()) <= float(r.scales.max()) / 2 + 1e-6


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_partial_last_group(bits: int, act_order: bool) -> None:
    """group_size need not divide in_features (SmolLM2: 576 = 4*128 + 64): ceil(I/G) groups, exact round trip."""
    from inlaid.quant.pack import dequantize, pack, unpack

    w, x, h = _problem()
    w, x, h = w[:, :96], x[:, :96], h[:96, :96]  # 96 = 64 + a partial group of 32
    q = gptq_quantize(w, h, bits, 64, act_order=act_order, static_groups=act_order)
    r = rtn_quantize(w, bits, 64)
    for res in (q, r):
        assert tuple(res.scales.shape) == (2, OUT) and tuple(res.zeros.shape) == (2, OUT)
        assert torch.equal(res.g_idx, (torch.arange(96) // 64).to(torch.int32))
        assert torch.equal(res.dequantize(), res.weight)
        tensors = pack(res)
        assert tuple(tensors["scales"].shape) == (2, OUT)
        codes, _, zeros, g_idx = unpack(tensors, bits, 64)
        assert torch.equal(codes, res.qweight) and torch.equal(zeros, res.zeros) and torch.equal(g_idx, res.g_idx)
        assert torch.equal(dequantize(tensors, bits), res.weight)
    # the partial group has its own grid: its scale follows its own columns only
    tail = rtn_quantize(w[:, 64:], bits, 32)
    assert torch.equal(r.scales[1], tail.scales[0])
    assert _out_err(w, q.weight, x) < _out_err(w, r.weight, x)
