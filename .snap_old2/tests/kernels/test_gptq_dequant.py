"""Torch reference GPTQ dequant/linear vs a float reference built from an explicit per-bit layout."""

from __future__ import annotations

import pytest
import torch

from inlaid.kernels.gptq_dequant import dequantize_gptq, gptq_linear, unpack_rows


def _bitstream_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[R, C]`` along dim 0 one bit at a time: value j of each 32-row run at stream bit bits*j."""
    rows, cols = codes.shape
    words = torch.zeros(rows * bits // 32, cols, dtype=torch.int64)
    for r in range(rows):
        run, j = divmod(r, 32)
        for b in range(bits):
            pos = bits * j + b
            bit = (codes[r].to(torch.int64) >> b) & 1
            words[run * bits + pos // 32] |= bit << (pos % 32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _case(bits: int, k: int, n: int, gs: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    groups = k // gs
    codes = torch.randint(0, 2**bits, (k, n), generator=g)
    zeros = torch.randint(1, 2**bits, (groups, n), generator=g)
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 1e-3).half()
    g_idx = torch.randperm(k, generator=g) // gs  # act-order style, non-monotonic
    qweight = _bitstream_pack(codes, bits)
    qzeros = _bitstream_pack((zeros - 1).t().contiguous(), bits).t().contiguous()
    ref = (codes - zeros[g_idx]).double() * scales.double()[g_idx]
    return qweight, qzeros, scales, g_idx.to(torch.int32), ref, codes


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_matches_float_reference(bits: int) -> None:
    qweight, qzeros, scales, g_idx, ref, codes = _case(bits, k=64, n=32, gs=32, seed=bits)
    assert torch.equal(unpack_rows(qweight, bits), codes.to(torch.int32))
    w = dequantize_gptq(qweight, qzeros, scales, g_idx, bits)
    assert w.dtype == torch.float16 and tuple(w.shape) == (64, 32)
    assert torch.equal(w, ref.half())  # one rounding of an exact product
    w32 = dequantize_gptq(qweight, qzeros, scales.float(), g_idx, bits)
    assert torch.equal(w32.double(), ref)


def test_linear_matches_reference_with_bias() -> None:
    qweight, qzeros, scales, g_idx, ref, _ = _case(4, k=128, n=32, gs=64, seed=11)
    x = torch.randn(3, 5, 128)
    bias = torch.randn(32)
    y = gptq_linear(x, qweight, qzeros, scales.float(), g_idx, 4, bias=bias)
    assert tuple(y.shape) == (3, 5, 32) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), x.double() @ ref + bias.double(), rtol=1e-5, atol=1e-5)


def test_stored_all_ones_reads_as_two_pow_bits() -> None:
    """v1 convention as AutoGPTQ/transformers kernels read it: stored + 1, no wrap."""
    qweight = torch.zeros(4, 8, dtype=torch.int32)  # 32 input rows at 4 bits, all codes 0
    qzeros = torch.full((1, 1), -1, dtype=torch.int32)  # every nibble 0xF
    w = dequantize_gptq(qweight, qzeros, torch.ones(1, 8), torch.zeros(32, dtype=torch.int32), 4)
    assert torch.equal(w, torch.full((32, 8), -16.0))


def test_bad_shapes_raise() -> None:
    qweight, qzeros, scales, g_idx, _, _ = _case(4, k=64, n=32, gs=32, seed=1)
    with pytest.raises(ValueError, match="g_idx"):
        dequantize_gptq(qweight, qzeros, scales, g_idx[:-1], 4)
    with pytest.raises(ValueError, match="scales"):
        dequantize_gptq(qweight, qzeros, scales[:, :-1], g_idx, 4)
    with pytest.raises(ValueError, match="bits"):
        dequantize_gptq(qweight, qzeros, scales, g_idx, 5)
    with pytest.raises(ValueError, match="g_idx values"):
        dequantize_gptq(qweight, qzeros, scales, g_idx + 5, 4)
    with pytest.raises(ValueError, match="features"):
        gptq_linear(torch.randn(2, 63), qweight, qzeros, scales, g_idx, 4)
    with pytest.raises(ValueError, match="int32"):
        unpack_rows(qweight.long(), 4)
