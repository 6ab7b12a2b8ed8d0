"""W4A16 kernels (Triton: GEMV, tiled GEMM, dequantize) vs the torch GPTQ reference ``gptq_dequant.gptq_linear``.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` on tiny shapes; with
CUDA the same tests run compiled, plus ``gpu`` tests at Llama-2-7B shapes and
the SmolLM2 partial-group shape. Weights are packed here one nibble at a time
(independent of the module's pack helpers), the reference reads the original,
un-permuted g_idx, and every output starts NaN-poisoned so an unwritten
element fails the check.
"""

from __future__ import annotations

import pytest
import torch
from triton_setup import (  # skips the module without triton
    DEVICE,
    assert_close,
    gptq_reference,
    kernel_module,
    pack_nibbles,
)

from inlaid.kernels import gptq_dequant

wk = kernel_module("w4a16_gemm")
Gemv = wk.GemvConfig


def _case(k: int, n: int, gs: int, act_order: bool, seed: int):
    """Random GPTQ tensors; ``gs=-1`` is one group per column; K % gs != 0 leaves a partial last group."""
    g = torch.Generator().manual_seed(seed)
    gs_eff = k if gs == -1 else gs
    groups = -(-k // gs_eff)
    codes = torch.randint(0, 16, (k, n), generator=g)
    zeros = torch.randint(1, 16, (groups, n), generator=g)
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 1e-3).half()
    g_idx = (torch.randperm(k, generator=g) if act_order else torch.arange(k)) // gs_eff
    qweight = pack_nibbles(codes)
    qzeros = pack_nibbles((zeros - 1).t().contiguous()).t().contiguous()
    return [t.to(DEVICE) for t in (qweight, qzeros, scales, g_idx.to(torch.int32))]


def _poisoned(m: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)


@pytest.mark.parametrize(
    "dtype,k,gs,act_order,cfg",
    [
        (torch.float16, 256, 32, False, wk.W4Config(block_m=16, block_n=32, block_k=32, split_k=1)),
        (torch.float16, 256, 64, True, wk.W4Config(block_m=16, block_n=32, block_k=64, split_k=3)),
        (torch.bfloat16, 256, 128, True, wk.W4Config(block_m=16, block_n=16, block_k=64, split_k=2)),
        (torch.float16, 192, 128, True, wk.W4Config(block_m=16, block_n=32, block_k=64, split_k=2)),  # partial
        (torch.float16, 192, -1, False, wk.W4Config(block_m=16, block_n=32, block_k=64, split_k=1)),  # one group
        (torch.bfloat16, 256, 32, False, None),
    ],
)
def test_tiled_gemm_matchesgptq_reference(dtype: torch.dtype, k: int, gs: int, act_order: bool, cfg) -> None:
    n, m = 48, 5  # n=48 leaves a partial N tile for block_n=32; m < block_m
    qweight, qzeros, scales, g_idx = _case(k, n, gs, act_order, seed=k + gs + act_order)
    packed = wk.prepare_w4(qweight, qzeros, scales, None if gs == -1 else g_idx, gs)
    assert (packed.perm is not None) == act_order
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    out = _poisoned(m, n, dtype)
    y = wk.w4a16_gemm(x, packed.qweight, packed.qzeros, packed.scales, packed.perm, packed.group_size, cfg, out=out)
    assert y.data_ptr() == out.data_ptr() and y.dtype == dtype
    assert_close(y, gptq_reference(x, qweight, qzeros, scales, g_idx), rel=1e-2)


@pytest.mark.parametrize(
    "dtype,k,gs,act_order,m,cfg",
    [
        (torch.float16, 256, 128, False, 1, Gemv(32, 64, 3, 4, False, "reduce")),  # M=1, split-K (4 steps / 3)
        (torch.bfloat16, 256, 64, True, 3, Gemv(32, 128, 2, 4, False, "fixup")),  # BLOCK_M=4, one row masked
        (torch.float16, 256, 32, False, 2, Gemv(16, 64, 1, 4, False, "reduce")),  # no split: direct store
        (torch.float16, 256, 128, True, 5, Gemv(32, 128, 2, 4, True, "reduce")),  # M=5: tl.dot path
        (torch.bfloat16, 256, 32, False, 16, Gemv(16, 128, 2, 4, True, "fixup")),  # tile spans 4 groups
        (torch.float16, 576, 128, True, 1, Gemv(16, 128, 5, 4, False, "fixup")),  # partial last group (SmolLM2 K)
        (torch.float16, 576, 128, False, 5, Gemv(16, 256, 2, 4, True, "atomic")),  # partial group, bk > gs
        (torch.bfloat16, 192, -1, False, 4, Gemv(16, 64, 2, 4, False, "atomic")),  # one group per column
        (torch.float16, 256, 64, False, 4, None),  # untuned default config
        (torch.float16, 512, 128, False, 1, Gemv(32, 128, 3, 4, False, "atomic_last")),  # M=1, one launch
        (torch.bfloat16, 576, 128, True, 1, Gemv(16, 128, 5, 4, False, "atomic_last")),  # partial last group
        (torch.float16, 256, 64, False, 3, Gemv(32, 64, 2, 4, False, "atomic_last")),  # M>1: acc too short
        (torch.float16, 256, 32, True, 1, Gemv(32, 128, 2, 4, False, "atomic_last")),  # M=1: K step fitted to 32
    ],
)
def test_gemv_matchesgptq_reference(dtype: torch.dtype, k: int, gs: int, act_order: bool, m: int, cfg) -> None:
    n = 48  # leaves a partial N tile for block_n=32
    qweight, qzeros, scales, g_idx = _case(k, n, gs, act_order, seed=k + gs + m)
    packed = wk.prepare_w4(qweight, qzeros, scales, None if gs == -1 else g_idx, gs)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    out = _poisoned(m, n, dtype)
    ref = gptq_reference(x, qweight, qzeros, scales, g_idx)
    for _ in range(2):  # the second call reuses the semaphores and the fp32 row the first left zeroed
        y = wk.w4a16_gemv(x, packed.qweight, packed.qzeros, packed.scales, packed.perm, packed.group_size, cfg,
                          out=out, locks=packed.locks, acc=packed.acc)  # fmt: skip
        assert y.data_ptr() == out.data_ptr()
        assert_close(y, ref, rel=1e-2)
        out.fill_(float("nan"))
    assert int(packed.locks.abs().sum()) == 0, "fixup modes must leave their semaphores zeroed for the next call"
    assert float(packed.acc.abs().sum()) == 0, "atomic_last must leave its fp32 row zeroed for the next call"


def test_gemv_config_validation_and_default_table() -> None:
    for k, n in ((4096, 4096), (4096, 11008), (11008, 4096), (576, 1536)):
        for m in range(1, wk.GEMV_MAX_M + 1):
            cfg = wk.default_gemv_config(m, n, k)
            assert cfg.use_dot == (m > 4) and 1 <= cfg.split_k <= -(-k // cfg.block_k)
    with pytest.raises(ValueError, match="mode"):
        Gemv(mode="spin")
    with pytest.raises(ValueError, match="use_dot"):
        Gemv(block_k=64, use_dot=True)
    with pytest.raises(ValueError, match="powers of two"):
        Gemv(block_n=96)


def test_linear_dispatch_all_paths_with_bias_and_3d_input() -> None:
    k, n, gs = 128, 32, 64
    qweight, qzeros, scales, g_idx = _case(k, n, gs, act_order=True, seed=7)
    packed = wk.prepare_w4(qweight, qzeros, scales, g_idx, gs)
    x = torch.randn(2, 3, k, device=DEVICE).half()
    bias = torch.randn(n, device=DEVICE).half()
    ref = gptq_reference(x.reshape(-1, k), qweight, qzeros, scales, g_idx) + bias.double()
    for fused, gemv in ((16, 16), (16, 0), (0, 0)):  # GEMV (M=6), tiled, dequantize + matmul
        y = wk.w4a16_linear(x, packed, bias=bias, fused_max_m=fused, gemv_max_m=gemv)
        assert y.shape == (2, 3, n) and y.dtype == torch.float16
        assert_close(y.reshape(-1, n), ref, rel=1e-2)


def test_dequantize_w4_matches_reference_exactly_with_partial_group() -> None:
    for k, gs in ((128, 32), (96, 64), (96, 20), (256, 256)):  # group 20: the torch path (not a multiple of 8)
        qweight, qzeros, scales, g_idx = _case(k, 32, gs, act_order=False, seed=3)
        w = wk.dequantize_w4(qweight, qzeros, scales, gs, torch.float16)
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
    with pytest.raises(ValueError, match="scales"):  # 64 rows at group 24 need 3 groups, not 4
        wk.w4a16_gemm(torch.randn(2, 64, device=DEVICE).half(), qweight, qzeros, scales, None, 24)
    with pytest.raises(ValueError, match="% 8"):  # 4 groups of 20 rows (the last partial): not kernel-ready
        wk.w4a16_gemv(torch.randn(2, 64, device=DEVICE).half(), qweight, qzeros, scales, None, 20)
    with pytest.raises(ValueError, match="half2 tile"):  # fp32 x (and the CPU interpreter) have no half2 tile
        wk.w4a16_gemv(torch.randn(1, 64, device=DEVICE), qweight, qzeros, scales, None, 16, half2=True)


@pytest.mark.gpu
@pytest.mark.parametrize("k,n,gs", [(4096, 4096, 128), (11008, 4096, 128), (576, 1536, 128), (4096, 4096, 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_real_shapes_every_path(k: int, n: int, gs: int, dtype: torch.dtype) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    groups = -(-k // gs)
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), device="cuda", dtype=torch.int32, generator=g)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (groups, n // 8), device="cuda", dtype=torch.int32, generator=g)
    scales = (torch.rand(groups, n, device="cuda", generator=g) * 0.02 + 1e-3).half()
    g_idx = (torch.randperm(k, device="cuda", generator=g) // gs).to(torch.int32)
    packed = wk.prepare_w4(qweight, qzeros, scales, g_idx, gs)
    for m in (1, 3, 7, 16, 64, 200):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = gptq_dequant.gptq_linear(x.float(), qweight, qzeros, scales.float(), g_idx, 4).double()
        out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        assert_close(wk.w4a16_gemm(x, packed.qweight, packed.qzeros, packed.scales, packed.perm, gs, out=out), ref,
                      rel=1e-2)
        if m <= wk.GEMV_MAX_M:
            for mode in ("reduce", "fixup", "atomic"):
                cfg = Gemv(**{**wk.default_gemv_config(m, n, k).to_dict(), "mode": mode})
                y = wk.w4a16_gemv(x, packed.qweight, packed.qzeros, packed.scales, packed.perm, gs, cfg,
                                  out=torch.full((m, n), float("nan"), device="cuda", dtype=dtype), locks=packed.locks)
                assert_close(y, ref, rel=1e-2)
            assert int(packed.locks.abs().sum()) == 0
        assert_close(wk.w4a16_linear(x, packed), ref, rel=1e-2)  # tuned table
        assert_close(wk.w4a16_linear(x, packed, fused_max_m=0, gemv_max_m=0), ref, rel=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_half2_tile_matches_the_fp32_tile_and_stays_finite_at_the_fp16_limit(dtype: torch.dtype) -> None:
    """The M = 1 kernel's half2 PTX tile (fp16/bf16 x) against an fp64 reference and against the fp32 tile (fp32
    x): ordinary activations, then the worst word of the overflow bound: x = 65504 on its 8 channels and
    code - zero = -16 there, so each half of its fp16 sum reaches 4 * 16 * (65504 * 2**-7) ~ 2**15 and must stay
    finite (group 0's scales are small so that the fp16 output itself cannot overflow)."""
    gemv = kernel_module("w4a16_gemv")
    k, n, gs = 4096, 1024, 128
    gen = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 16, (k, n), generator=gen)
    zeros = torch.randint(1, 16, (k // gs, n), generator=gen)
    scales = torch.rand(k // gs, n, generator=gen) * 0.02 + 1e-3
    codes[:8], zeros[0], scales[0] = 0, 16, 1e-4  # word row 0: code - zero = -16 on every column
    qweight = pack_nibbles(codes).cuda()
    qzeros = pack_nibbles((zeros - 1).t().contiguous()).t().contiguous().cuda()
    scales, g_idx = scales.half().cuda(), (torch.arange(k) // gs).to(torch.int32).cuda()
    packed = wk.prepare_w4(qweight, qzeros, scales, g_idx, gs)
    for big in (False, True):
        x = torch.randn(1, k, generator=gen)
        if big:
            x[0, :8] = 65504.0
        x = x.to(dtype).cuda()
        assert gemv.half2_path(x) and not gemv.half2_path(x.float())
        ref = gptq_reference(x, qweight, qzeros, scales, g_idx)
        y = wk.w4a16_gemv(x, packed.qweight, packed.qzeros, packed.scales, packed.perm, gs, out=_poisoned(1, n, dtype))
        y32 = wk.w4a16_gemv(x.float(), packed.qweight, packed.qzeros, packed.scales, packed.perm, gs)
        assert_close(y32, ref, rel=1e-5)
        y_fp32_tile = wk.w4a16_gemv(x, packed.qweight, packed.qzeros, packed.scales, packed.perm, gs, half2=False)
        assert_close(y_fp32_tile, ref, rel=3e-3 if dtype == torch.float16 else 1e-2)
        assert_close(y, ref, rel=3e-3 if dtype == torch.float16 else 1e-2)  # also: every element finite
