"""Fused W4A16 GEMM (Triton) vs the torch GPTQ reference ``gptq_dequant.gptq_linear``.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` on tiny shapes; with
CUDA the same tests run compiled, plus a ``gpu`` test at Llama-2-7B shapes.
Weights are packed here one nibble at a time (independent of the module's
pack helpers) and the reference reads the original, un-permuted g_idx.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from triton_setup import DEVICE, kernel_module  # skips the module without triton
from inlaid.kernels import gptq_dequant

wk = kernel_module("w4a16_gemm")


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack int codes [8R, C] along dim 0: row 8r+j at bits 4j..4j+3 of word r (plain loop)."""
    rows, cols = codes.shape
    words = torch.zeros(rows // 8, cols, dtype=torch.int64)
    for r in range(rows):
        words[r // 8] |= codes[r].to(torch.int64) << (4 * (r % 8))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _case(k: int, n: int, gs: int, act_order: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    groups = k // gs
    codes = torch.randint(0, 16, (k, n), generator=g)
    zeros = torch.randint(1, 16, (groups, n), generator=g)
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 1e-3).half()
    g_idx = (torch.randperm(k, generator=g) if act_order else torch.arange(k)) // gs
    qweight = _pack_nibbles(codes)
    qzeros = _pack_nibbles((zeros - 1).t().contiguous()).t().contiguous()
    return [t.to(DEVICE) for t in (qweight, qzeros, scales, g_idx.to(torch.int32))]


def _reference(x: torch.Tensor, qweight, qzeros, scales, g_idx) -> torch.Tensor:
    return gptq_dequant.gptq_linear(x.double(), qweight, qzeros, scales.double(), g_idx, 4)


def _assert_close(y: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    assert torch.isfinite(y).all(), "some output elements were not written (NaN poison survived)"
    err = (y.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * scale, f"max abs err {err:.3g} > {rel} * max|ref| {scale:.3g}"


@pytest.mark.parametrize(
    "dtype,gs,act_order,cfg",
    [
        (torch.float16, 32, False, wk.W4Config(block_m=16, block_n=32, block_k=32, split_k=1)),
        (torch.float16, 64, True, wk.W4Config(block_m=16, block_n=32, block_k=64, split_k=3)),
        (torch.bfloat16, 128, True, wk.W4Config(block_m=16, block_n=16, block_k=64, split_k=2)),
        (torch.bfloat16, 32, False, None),
    ],
)
def test_fused_gemm_matches_reference(dtype: torch.dtype, gs: int, act_order: bool, cfg) -> None:
    k, n, m = 256, 48, 5  # n=48 leaves a partial N tile for block_n=32; m < block_m
    qweight, qzeros, scales, g_idx = _case(k, n, gs, act_order, seed=gs + act_order)
    packed = wk.prepare_w4(qweight, qzeros, scales, g_idx, gs)
    assert (packed.perm is not None) == act_order
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    out = torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)
    y = wk.w4a16_gemm(x, packed.qweight, packed.qzeros, packed.scales, packed.perm, gs, cfg, out=out)
    assert y.data_ptr() == out.data_ptr() and y.dtype == dtype
    _assert_close(y, _reference(x, qweight, qzeros, scales, g_idx), rel=1e-2)


@pytest.mark.parametrize(
    "dtype,gs,act_order,m,cfg",
    [
        (torch.float16, 128, False, 1, wk.SkinnyConfig(1, 32, 64, 3, 4, False, "reduce")),
        (torch.bfloat16, 64, True, 3, wk.SkinnyConfig(4, 32, 128, 2, 4, False, "fixup")),
        (torch.float16, 32, False, 2, wk.SkinnyConfig(2, 16, 64, 1, 4, False, "reduce")),
        (torch.float16, 128, True, 5, wk.SkinnyConfig(16, 32, 128, 2, 4, True, "reduce")),
        (torch.bfloat16, 32, False, 16, wk.SkinnyConfig(16, 16, 128, 2, 4, True, "fixup")),
        (torch.float16, 64, False, 4, None),
    ],
)
def test_skinny_gemm_matches_reference(dtype: torch.dtype, gs: int, act_order: bool, m: int, cfg) -> None:
    k, n = 256, 48  # n=48 leaves a partial N tile for block_n=32; k=256 gives 2-4 K tiles to split
    qweight, qzeros, scales, g_idx = _case(k, n, gs, act_order, seed=gs + m)
    packed = wk.prepare_w4(qweight, qzeros, scales, g_idx, gs)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    out = torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)
    y = wk.w4a16_skinny(x, packed.qweight, packed.qzeros, packed.scales, packed.perm, gs, cfg, out=out,
                        locks=packed.locks)
    assert y.data_ptr() == out.data_ptr()
    _assert_close(y, _reference(x, qweight, qzeros, scales, g_idx), rel=1e-2)
    assert int(packed.locks.abs().sum()) == 0, "fixup mode must leave its semaphores zeroed for the next call"


def test_skinny_config_table_is_valid_for_llama_shapes() -> None:
    for k, n in ((4096, 4096), (4096, 11008), (11008, 4096), (576, 192)):
        for m in range(1, wk.SKINNY_MAX_M + 1):
            cfg = wk.skinny_config(m, n, k)
            assert cfg.block_m >= m or cfg.use_dot or cfg.block_m == 4
            assert 1 <= cfg.split_k <= max(1, -(-k // cfg.block_k))
    with pytest.raises(ValueError, match="mode"):
        wk.SkinnyConfig(mode="atomic")
    with pytest.raises(ValueError, match="block_k"):
        wk.SkinnyConfig(block_m=16, block_k=64, use_dot=True)


def test_linear_dispatch_both_paths_with_bias_and_3d_input() -> None:
    k, n, gs = 128, 32, 64
    qweight, qzeros, scales, g_idx = _case(k, n, gs, act_order=True, seed=7)
    packed = wk.prepare_w4(qweight, qzeros, scales, g_idx, gs)
    x = torch.randn(2, 3, k, device=DEVICE).half()
    bias = torch.randn(n, device=DEVICE).half()
    ref = _reference(x.reshape(-1, k), qweight, qzeros, scales, g_idx) + bias.double()
    for threshold, skinny in ((16, 16), (16, 0), (0, 16)):  # skinny (M=6), fused, dequantize + matmul
        y = wk.w4a16_linear(x, packed, bias=bias, fused_max_m=threshold, skinny_max_m=skinny)
        assert y.shape == (2, 3, n) and y.dtype == torch.float16
        _assert_close(y.reshape(-1, n), ref, rel=1e-2)


def test_dequantize_w4_matches_reference_exactly() -> None:
    qweight, qzeros, scales, g_idx = _case(128, 32, 32, act_order=False, seed=3)
    w = wk.dequantize_w4(qweight, qzeros, scales, 32, torch.float16)
    assert torch.equal(w, gptq_dequant.dequantize_gptq(qweight, qzeros, scales, g_idx, 4))


def test_pack_unpack_and_act_order_permutation() -> None:
    qweight, _, _, g_idx = _case(64, 16, 16, act_order=True, seed=5)
    codes = gptq_dequant.unpack_rows(qweight.cpu(), 4)
    assert torch.equal(wk.unpack4_rows(qweight.cpu()), codes)
    assert torch.equal(wk.pack4_rows(codes), qweight.cpu())
    qw_sorted, perm = wk.prepare_act_order(qweight, g_idx, 16)
    assert torch.equal(g_idx[perm].long().cpu(), torch.arange(64) // 16)
    assert torch.equal(wk.unpack4_rows(qw_sorted.cpu()), codes[perm.cpu()])


def test_bad_inputs_raise_value_error() -> None:
    qweight, qzeros, scales, g_idx = _case(64, 16, 16, act_order=False, seed=1)
    uneven = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    uneven[:40] = 1  # groups of 24 and 40 rows: not sortable into equal groups
    with pytest.raises(ValueError, match="equal groups"):
        wk.prepare_act_order(qweight, uneven, 16)
    packed = wk.prepare_w4(qweight, qzeros, scales, g_idx, 16)
    with pytest.raises(ValueError, match="features"):
        wk.w4a16_linear(torch.randn(2, 32, device=DEVICE).half(), packed)
    with pytest.raises(ValueError, match="group_size"):
        wk.w4a16_gemm(torch.randn(2, 64, device=DEVICE).half(), qweight, qzeros, scales, None, 24)


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(4096, 4096), (11008, 4096)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_llama_shapes(k: int, n: int, dtype: torch.dtype) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), device="cuda", dtype=torch.int32, generator=g)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (k // 128, n // 8), device="cuda", dtype=torch.int32, generator=g)
    scales = (torch.rand(k // 128, n, device="cuda", generator=g) * 0.02 + 1e-3).half()
    g_idx = (torch.randperm(k, device="cuda", generator=g) // 128).to(torch.int32)
    packed = wk.prepare_w4(qweight, qzeros, scales, g_idx, 128)
    for m in (1, 3, 7, 16, 64, 200):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = gptq_dequant.gptq_linear(x.float(), qweight, qzeros, scales.float(), g_idx, 4).double()
        out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        y = wk.w4a16_gemm(x, packed.qweight, packed.qzeros, packed.scales, packed.perm, 128, out=out)
        _assert_close(y, ref, rel=1e-2)
        if m <= wk.SKINNY_MAX_M:
            for mode in ("reduce", "fixup"):
                cfg = dataclasses.replace(wk.skinny_config(m, n, k), mode=mode)
                out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
                _assert_close(wk.w4a16_skinny(x, packed.qweight, packed.qzeros, packed.scales, packed.perm, 128,
                                              cfg, out=out, locks=packed.locks), ref, rel=1e-2)
            assert int(packed.locks.abs().sum()) == 0
        _assert_close(wk.w4a16_linear(x, packed, fused_max_m=0), ref, rel=1e-2)
