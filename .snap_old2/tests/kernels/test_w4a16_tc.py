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


def _check(y: torch.Tensor, x: torch.Tensor, tensors, packed) -> None:
    assert_close(y, gptq_reference(x, *tensors), TOL[x.dtype])
    assert int(packed.locks.abs().sum()) == 0 and float(packed.acc.abs().sum()) == 0, "buffers must stay zeroed"


def test_split_covers_k_with_whole_steps() -> None:
    for k, n in ((4096, 4096), (4096, 11008), (11008, 4096), (576, 1536), (128, 64)):
        split, per = tc.tc_split(k, n, 256, sms=132)
        assert per % tc.TC_BLOCK_K == 0 and (split - 1) * per < k <= split * per


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
    _check(wk.w4a16_linear(x, packed), x, tensors, packed)  # the dispatcher picks this kernel for 2 <= M <= 16


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_with_new_inputs() -> None:
    tensors, packed = gptq_case(4096, 4096, 128, act_order=True, seed=11)
    x = torch.randn(8, 4096, device="cuda", dtype=torch.float16)
    out = torch.empty(8, 4096, device="cuda", dtype=torch.float16)
    call = lambda: tc.w4a16_tc(x, packed.qweight, packed.qzeros, packed.scales, packed.perm,
                               packed.group_size, out=out, locks=packed.locks)
    graph = capture_graph(call)
    for _ in range(50):  # replays see fresh inputs: no stale sums, semaphores reset
        x.copy_(torch.randn_like(x))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check(out, x, tensors, packed)


def test_bad_inputs_raise_value_error() -> None:
    _, packed = gptq_case(256, 16, 64, act_order=False, seed=1)
    with pytest.raises(ValueError, match="w4a16_tc needs"):
        tc.w4a16_tc(torch.randn(2, 256, device=DEVICE).half(), packed.qweight, packed.qzeros, packed.scales, None, 64)
