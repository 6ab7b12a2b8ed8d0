"""Grouped W4A16 (q/k/v, gate/up of one x in one launch: the M = 1 GEMV and, on CUDA, the tensor-core kernel for
M = 2..128) vs the torch GPTQ reference and vs per-weight calls; the GPTQ linear method's ``apply_group`` and
the model's ``forward_group`` rules.

CPU: the kernel under ``TRITON_INTERPRET=1`` on small shapes; CUDA: compiled, plus ``gpu`` tests at Llama-2-7B
shapes (act-order, bias, CUDA-graph replays). Outputs start NaN-poisoned (``w4a16_gemv_m1_group`` allocates them,
so a missing tile would be garbage: the reference comparison catches it), and every call must leave each weight's
``locks`` / ``acc`` zeroed.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from triton_setup import (  # skips the module without triton
    DEVICE,
    TOL,
    assert_close,
    capture_graph,
    gptq_case,
    gptq_reference,
    kernel_module,
)

gemv = kernel_module("w4a16_gemv")
wk = kernel_module("w4a16_gemm")
tc = kernel_module("w4a16_tc")
from inlaid.kernels.w4_layout import prepare_w4  # noqa: E402


def _group(k: int, widths: tuple[int, ...], gs: int, act_order: bool, seed: int):
    """Weights of one x: random codes per weight, ONE shared g_idx, and their ``PackedW4`` sharing one act-order
    permutation tensor (the grouped kernel needs the same tensor); returns ([tensors per weight], [PackedW4])."""
    shared = gptq_case(k, 8, gs, act_order, seed)[0][3]
    tensors, packs = [], []
    for j, n in enumerate(widths):
        t = gptq_case(k, n, gs, False, seed + j + 1)[0]
        t[3] = shared
        tensors.append(t)
        p = prepare_w4(*t[:3], shared, k if gs == -1 else gs)
        packs.append(p if not packs else dataclasses.replace(p, perm=packs[0].perm))
    return tensors, packs


def _zeroed(packs) -> bool:
    """Each weight's semaphores and sums, and the shared split-K scratch (the tensor-core group's), are zero."""
    shared = [t for kept in gemv._SCRATCH.values() for pair in kept for t in pair]
    return all(int(t.count_nonzero()) == 0 for t in [*shared, *(b for p in packs for b in (p.locks, p.acc))])


@pytest.mark.parametrize(
    "widths,gs,act_order,cfg",
    [
        ((64, 32, 32), 64, True, gemv.GemvConfig(32, 64, 2, 4, False, "atomic_last", 1)),  # q/k/v-like, GQA
        ((48, 48), 128, False, gemv.GemvConfig(16, 64, 3, 4, False, "fixup", 2)),  # gate/up-like
        ((40, 24, 16), -1, False, gemv.GemvConfig(16, 32, 1, 4, False, "atomic_last", 1)),  # one group, no split
        ((32, 32), 64, False, gemv.GemvConfig(32, 64, 4, 4, False, "reduce", 1)),
        ((32, 32), 32, True, gemv.GemvConfig(32, 128, 2, 4, False, "atomic_last", 1)),  # K step fitted to 32
    ],
)
def test_group_matches_reference_and_single_calls(widths, gs, act_order, cfg) -> None:
    k = 256
    tensors, packs = _group(k, widths, gs, act_order, seed=len(widths) + gs)
    x = torch.randn(1, k, device=DEVICE).half()
    assert gemv.m1_groupable(x, packs, cfg)
    for _ in range(2):  # the second call reuses the semaphores and sums the first left zeroed
        ys = gemv.w4a16_gemv_m1_group(x, packs, cfg)
        for y, t, p in zip(ys, tensors, packs):
            assert y.shape == (1, p.out_features)
            assert_close(y, gptq_reference(x, *t), TOL[x.dtype])
            single = gemv.w4a16_gemv(x, p.qweight, p.qzeros, p.scales, p.perm, p.group_size, cfg)
            torch.testing.assert_close(y, single, atol=1e-3, rtol=1e-3)
        assert _zeroed(packs)


@pytest.mark.parametrize("mode", ["atomic", "atomic_last", "fixup"])
def test_group_members_without_own_buffers_get_separate_scratch(mode) -> None:
    """Weights without their own ``locks`` / ``acc`` (a ``PackedW4`` built by hand) share the stream's split-K
    scratch: each must get its own slice (``w4a16_gemv.group_buffers``), or the members' sums and semaphores
    collide. Two 64-wide weights, K = 512 in 4 splits."""
    k, cfg = 512, gemv.GemvConfig(64, 64, 4, 4, False, mode, 1)
    tensors, packs = _group(k, (64, 64), 64, False, seed=7)
    packs = [dataclasses.replace(p, locks=None, acc=None) for p in packs]
    x = torch.randn(1, k, device=DEVICE).half()
    for _ in range(2):
        ys = gemv.w4a16_gemv_m1_group(x, packs, cfg)
        for y, t in zip(ys, tensors):
            assert_close(y, gptq_reference(x, *t), TOL[x.dtype])
        assert _zeroed([])


def test_not_groupable_cases_and_the_dispatcher_fallback() -> None:
    cfg = gemv.GemvConfig(32, 64, 2, 4, False, "atomic_last", 1)
    _, packs = _group(256, (32, 32), 64, True, seed=1)
    _, other = _group(256, (32,), 64, True, seed=9)  # another act-order permutation
    x = torch.randn(1, 256, device=DEVICE).half()
    assert not gemv.m1_groupable(torch.randn(2, 256, device=DEVICE).half(), packs, cfg)  # two rows
    assert not gemv.m1_groupable(x, packs[:1], cfg)  # one weight
    assert not gemv.m1_groupable(x, [packs[0], other[0]], cfg)  # different permutations
    copy = dataclasses.replace(packs[1], perm=packs[1].perm.clone())
    assert not gemv.m1_groupable(x, [packs[0], copy], cfg)  # equal contents, another tensor: not compared
    long_step = gemv.GemvConfig(32, 128, 2, 4, False, "atomic_last", 1)  # two groups per step: fitted to one
    assert gemv.m1_groupable(x, packs, long_step) and gemv.m1_fit(long_step, 64).block_k == 64
    assert not gemv.m1_groupable(x, packs, dataclasses.replace(long_step, use_dot=True))  # not the M = 1 tile
    with pytest.raises(ValueError, match="w4a16_gemv_m1_group needs"):
        gemv.w4a16_gemv_m1_group(x, [packs[0], other[0]], cfg)
    # the dispatcher runs such a group one weight at a time, with the same results
    tensors, mixed = _group(256, (32,), 64, True, seed=1)
    t2, p2 = _group(256, (24,), 64, True, seed=9)
    bias = [torch.randn(32, device=DEVICE).half(), None]
    for xx in (x, torch.randn(3, 256, device=DEVICE).half()):
        ys = wk.w4a16_linear_group(xx, [mixed[0], p2[0]], bias)
        assert_close(ys[0], gptq_reference(xx, *tensors[0]) + bias[0].double(), TOL[xx.dtype])
        assert_close(ys[1], gptq_reference(xx, *t2[0]), TOL[xx.dtype])


def test_gptq_apply_group_equals_apply_and_taps_disable_grouping() -> None:
    from inlaid.model.layers import ParallelLinear, forward_group, wants_x_half
    from inlaid.quant.linear import GPTQLinearMethod

    layers = []
    tensors, _ = _group(256, (32, 16, 16), 64, False, seed=4)
    for t in tensors:
        lin = ParallelLinear(256, t[0].shape[1], False, "column", torch.device(DEVICE), torch.float16,
                             quant_method=GPTQLinearMethod(4, 64))
        for key, val in zip(("qweight", "qzeros", "scales", "g_idx"), t):
            getattr(lin, key).copy_(val)
        lin.quant_method.finalize(lin, torch.float16)
        layers.append(lin)
    for m in (1, 5):
        x = torch.randn(m, 256, device=DEVICE).half()
        for y, lin in zip(forward_group(layers, x), layers):
            torch.testing.assert_close(y, lin.forward_local(x), atol=1e-3, rtol=1e-3)
        stale = torch.zeros(x.shape, device=DEVICE, dtype=torch.float16)  # fp16 x: a copy is never read
        assert all(torch.equal(a, b) for a, b in zip(forward_group(layers, x, x_half=stale), forward_group(layers, x)))
    seen = []
    method = layers[0].quant_method
    inner = method.apply
    method.apply = lambda layer, x: seen.append(x.shape) or inner(layer, x)  # what calibrate's taps do
    forward_group(layers, torch.randn(1, 256, device=DEVICE).half())
    assert seen == [(1, 256)], "a wrapped apply must see the input even at one row"
    one = torch.randn(1, 256, device="cuda" if DEVICE == "cuda" else "cpu").bfloat16()
    assert not wants_x_half(layers[0], one), "no norm copy for a wrapped apply (nor on CPU)"
    del method.apply
    assert wants_x_half(layers[0], one) == (one.is_cuda and torch.cuda.is_available())
    assert not wants_x_half(layers[0], one.expand(2, 256))


def test_tc_group_refuses_what_it_cannot_serve() -> None:
    _, packs = _group(256, (32, 32), 128, False, seed=2)
    with pytest.raises(ValueError, match="w4a16_tc_group needs"):  # on CPU: no tensor cores; on CUDA: fp32 x
        tc.w4a16_tc_group(torch.randn(4, 256, device=DEVICE), packs)


@pytest.mark.gpu
@pytest.mark.parametrize("widths,k,m", [((4096, 4096, 4096), 4096, 1), ((11008, 11008), 4096, 1),
                                        ((1024, 256, 256), 1024, 1), ((4096, 1024, 1024), 4096, 7),
                                        ((11008, 11008), 4096, 16), ((4096, 4096, 4096), 4096, 32),
                                        ((1536, 1536), 576, 100)])
def test_gpu_llama_shapes_through_the_dispatcher_and_graphs(widths, k, m) -> None:
    tensors, packs = _group(k, widths, 128, True, seed=k + m)
    bias = [torch.randn(n, device="cuda").half() if j == 0 else None for j, n in enumerate(widths)]
    x = torch.randn(m, k, device="cuda").half()
    if m == 1:
        assert gemv.m1_groupable(x, packs, wk.gemv_config(x, 1, sum(widths), k))
    else:
        assert gemv.share_input(x, packs) and tc.tc_usable(x, 128)
        for y, t in zip(tc.w4a16_tc_group(x, packs), tensors):  # direct call: one launch for the group
            assert_close(y, gptq_reference(x, *t), TOL[x.dtype])
    outs = []
    graph = capture_graph(lambda: outs.append(wk.w4a16_linear_group(x, packs, bias)))
    for _ in range(20):  # replays with fresh inputs: no stale sums, semaphores reset
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        for y, t, b in zip(outs[-1], tensors, bias):
            ref = gptq_reference(x, *t) + (0 if b is None else b.double())
            assert_close(y, ref, TOL[x.dtype])
        assert _zeroed(packs)
