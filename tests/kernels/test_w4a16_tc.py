"""Tensor-core W4A16 kernel (``w4a16_tc``, inline PTX: CUDA only) vs the torch GPTQ reference.

The kernel cannot run under the CPU interpreter (no inline assembly), so its numeric tests are ``gpu`` tests;
on CPU the split arithmetic, ``tc_usable`` and the dispatcher's fallback to ``w4a16_small_m`` run. Weights are
packed one nibble at a time here (independent of the module's pack helpers), the reference reads the original
g_idx, outputs start NaN-poisoned, and every call must leave ``PackedW4.locks`` / ``PackedW4.acc`` zeroed.
"""

from __future__ import annotations

import pytest
import torch
from triton_setup import (  # skips the module without triton
    DEVICE,
    HAS_CUDA,
    TOL,
    assert_close,
    capture_graph,
    gptq_case,
    gptq_reference,
    kernel_module,
)

wk = kernel_module("w4a16_gemm")
tc = kernel_module("w4a16_tc")
gemv = kernel_module("w4a16_gemv")


def _scratch_zeroed() -> bool:
    return all(int(a.count_nonzero()) == 0 and int(lk.count_nonzero()) == 0 for kept in gemv._SCRATCH.values()
               for a, lk in kept)


def _check(y: torch.Tensor, x: torch.Tensor, tensors, packed) -> None:
    assert_close(y, gptq_reference(x, *tensors), TOL[x.dtype])
    assert int(packed.locks.abs().sum()) == 0 and float(packed.acc.abs().sum()) == 0, "buffers must stay zeroed"
    assert _scratch_zeroed(), "the shared split-K scratch must stay zeroed"


def test_split_covers_k_with_whole_steps() -> None:
    for k, n in ((4096, 4096), (4096, 11008), (11008, 4096), (576, 1536), (128, 64)):
        split, per = tc.tc_split(k, n, 256, sms=132)
        assert per % tc.TC_BLOCK_K == 0 and (split - 1) * per < k <= split * per


def test_default_configs_by_m_and_validation() -> None:
    assert [(c.block_m, c.natural, c.swap) for c in map(tc.tc_config, (1, 16, 17, 32, 33, 64, 128))] == [
        (16, False, False), (16, False, False), (32, True, True), (32, True, True), (64, True, True),
        (64, True, True), (128, True, True)]
    assert tc.tc_config(128, 11008).block_m == 64  # wide N keeps 64-row tiles above 64 rows
    for bad in ({"block_m": 24}, {"block_n": 8}, {"num_warps": 0}, {"programs_per_sm": 0},
                {"swap": True, "natural": False}):
        with pytest.raises(ValueError):
            tc.TcConfig(**bad)
    split, per = tc.tc_split(4096, 4096, 128, sms=132, programs_per_sm=2, m_tiles=4)
    assert split * 4 * 32 <= 2 * 132 * 1.5 and (split - 1) * per < 4096 <= split * per


def test_split_k_scratch_is_shared_per_stream_grows_and_keeps_old_buffers() -> None:
    dev = torch.device("cpu")
    gemv._SCRATCH.pop(("cpu", None, 0), None)  # only the CPU entry: CUDA graphs of other tests may hold theirs
    acc, locks = gemv.splitk_scratch(dev, 100, 10)
    assert acc.numel() >= 100 and locks.numel() >= 10 and not acc.any() and not locks.any()
    assert gemv.splitk_scratch(dev, 50, 5)[0] is acc  # enough: the same pair
    bigger, _ = gemv.splitk_scratch(dev, 101, 1)
    assert bigger.numel() >= 200 and bigger is not acc  # grows geometrically
    kept = gemv._SCRATCH[("cpu", None, 0)]
    assert any(a is acc for a, _ in kept), "graphs captured on the old pair still read it: it must stay alive"
    out = torch.empty(4, 8)
    ws, lk = gemv.splitk_buffers(out, 3, 4, None, 6, acc=torch.zeros(8))  # caller's acc too short: scratch
    assert ws is bigger and lk is kept[-1][1]
    gemv._SCRATCH.pop(("cpu", None, 0), None)


def test_usable_only_compiled_on_cuda_with_groups_of_128() -> None:
    x = torch.randn(2, 256, device=DEVICE).half()
    assert tc.tc_usable(x, 128) == HAS_CUDA and tc.tc_usable(x, 256) == HAS_CUDA
    assert not tc.tc_usable(x, 64) and not tc.tc_usable(x.float(), 128)


def test_dispatcher_falls_back_where_the_kernel_cannot_run() -> None:
    tensors, packed = gptq_case(256, 48, 64, act_order=True, seed=3)  # group 64: small-M kernel on every device
    x = torch.randn(4, 256, device=DEVICE).half()
    _check(wk.w4a16_linear(x, packed), x, tensors, packed)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "k,n,gs,act_order,m,dtype",
    [
        (4096, 4096, 128, False, 4, torch.float16),
        (11008, 4096, 128, True, 16, torch.bfloat16),
        (4096, 11008, 128, True, 2, torch.float16),
        (576, 1536, 128, False, 7, torch.bfloat16),  # SmolLM2: partial last group and step
        (576, 48, -1, True, 3, torch.float16),  # one group per column; N below one tile
        (1024, 4096, 256, False, 16, torch.float16),  # two steps per group
        (4096, 4096, 128, False, 32, torch.float16),  # 32-row tile
        (4096, 11008, 128, True, 64, torch.bfloat16),  # 64-row tile
        (11008, 4096, 128, False, 100, torch.float16),  # two row tiles, the second partial
        (576, 1536, 128, True, 256, torch.bfloat16),  # four row tiles
    ],
)
def test_gpu_matches_reference(k: int, n: int, gs: int, act_order: bool, m: int, dtype: torch.dtype) -> None:
    tensors, packed = gptq_case(k, n, gs, act_order, seed=k + n + m)
    for _ in range(3):  # later calls reuse the semaphores and the fp32 buffer the first left zeroed
        x = torch.randn(m, k, device="cuda").to(dtype)
        out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        y = tc.w4a16_tc(x, packed.qweight, packed.qzeros, packed.scales, packed.perm, packed.group_size, out=out,
                        locks=packed.locks, acc=packed.acc)
        assert y.data_ptr() == out.data_ptr()
        _check(y, x, tensors, packed)
    _check(wk.w4a16_linear(x, packed), x, tensors, packed)


@pytest.mark.gpu
@pytest.mark.parametrize("block_m,m", [(16, 40), (32, 96), (128, 200)])  # 8-dot kernel at 16, natural above
def test_gpu_row_tiles_with_each_block_m(block_m: int, m: int) -> None:
    tensors, packed = gptq_case(4096, 4096, 128, act_order=True, seed=block_m + m)
    for block_n, ppsm in ((128, 1), (64, 4)):  # no split and a 4-way-plus split: both epilogues
        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
        out = torch.full((m, 4096), float("nan"), device="cuda", dtype=torch.float16)
        cfg = tc.TcConfig(block_m=block_m, block_n=block_n, num_warps=8, programs_per_sm=ppsm, natural=block_m > 16)
        y = tc.w4a16_tc(x, packed.qweight, packed.qzeros, packed.scales, packed.perm, packed.group_size, out=out,
                        config=cfg)
        _check(y, x, tensors, packed)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [8, 48])  # 8-dot kernel; natural kernel on the stream's shared scratch
def test_gpu_cuda_graph_replay_with_new_inputs(m: int) -> None:
    tensors, packed = gptq_case(4096, 4096, 128, act_order=True, seed=11)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
    out = torch.empty(m, 4096, device="cuda", dtype=torch.float16)
    call = lambda: tc.w4a16_tc(x, packed.qweight, packed.qzeros, packed.scales, packed.perm,
                               packed.group_size, out=out, locks=packed.locks)
    graph = capture_graph(call)
    for _ in range(50):  # replays see fresh inputs: no stale sums, semaphores reset
        x.copy_(torch.randn_like(x))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check(out, x, tensors, packed)
    call()  # an eager call between replays (another stream's scratch) changes nothing for the graph
    graph.replay()
    torch.cuda.synchronize()
    _check(out, x, tensors, packed)


def test_bad_inputs_raise_value_error() -> None:
    _, packed = gptq_case(256, 16, 64, act_order=False, seed=1)
    with pytest.raises(ValueError, match="w4a16_tc needs"):
        tc.w4a16_tc(torch.randn(2, 256, device=DEVICE).half(), packed.qweight, packed.qzeros, packed.scales, None, 64)



@pytest.mark.gpu
@pytest.mark.parametrize("m,dtype", [(1, torch.float16), (5, torch.bfloat16), (32, torch.float16), (100, torch.bfloat16)])
def test_gpu_natural_order_variant(m: int, dtype: torch.dtype) -> None:
    tensors, packed = gptq_case(4096, 11008, 128, act_order=True, seed=m)
    for block_n, warps, ppsm in ((128, 8, 1), (64, 4, 2)):
        x = torch.randn(m, 4096, device="cuda", dtype=dtype)
        cfg = tc.TcConfig(block_m=16 if m <= 16 else 64, block_n=block_n, num_warps=warps, programs_per_sm=ppsm,
                          natural=True)
        y = tc.w4a16_tc(x, packed.qweight, packed.qzeros, packed.scales, packed.perm, packed.group_size, config=cfg)
        _check(y, x, tensors, packed)


@pytest.mark.gpu
@pytest.mark.parametrize("m,dtype", [(1, torch.float16), (5, torch.bfloat16), (32, torch.float16),
                                     (100, torch.bfloat16)])
def test_gpu_swapped_operands_variant(m: int, dtype: torch.dtype) -> None:
    tensors, packed = gptq_case(4096, 11008, 128, act_order=True, seed=m + 1)
    for block_m, block_n, warps, ppsm in ((16, 128, 4, 1), (32, 64, 4, 2), (64, 256, 8, 2)):
        x = torch.randn(m, 4096, device="cuda", dtype=dtype)
        out = torch.full((m, 11008), float("nan"), device="cuda", dtype=dtype)
        cfg = tc.TcConfig(block_m=block_m, block_n=block_n, num_warps=warps, programs_per_sm=ppsm, natural=True,
                          swap=True)
        y = tc.w4a16_tc(x, packed.qweight, packed.qzeros, packed.scales, packed.perm, packed.group_size, out=out,
                        config=cfg)
        _check(y, x, tensors, packed)
