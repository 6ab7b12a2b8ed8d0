"""The tensor-core layout (``w4_layout.to_tc_layout``) and its kernels (``w4a16_tcl``) vs the torch GPTQ reference.

On CPU: the layout's row map (checked nibble by nibble against the checkpoint's codes), its inverse, the
dequantize kernel and the kernels themselves under the Triton interpreter (``PTX`` off: plain shifts instead of
the inline-PTX unpack, the same layout and relabel math) at small shapes, ``w4a16_linear``'s paths for a "tc"
weight and the layout choice. The ``gpu`` tests run the PTX kernels at the 7B shapes. Every output starts
NaN-poisoned, the reference reads the original (unsorted) g_idx, and every call must leave ``PackedW4.locks`` /
``PackedW4.acc`` and the shared split-K scratch zeroed.
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
    pack_nibbles,
)

wk = kernel_module("w4a16_gemm")
tcl = kernel_module("w4a16_tcl")
gemv = kernel_module("w4a16_gemv")
dq = kernel_module("w4_dequant")
from inlaid.kernels import w4_layout as lay  # noqa: E402 (no kernels: plain import)


def _tc_case(k: int, n: int, gs: int, act_order: bool, seed: int):
    tensors, packed = gptq_case(k, n, gs, act_order, seed)
    tc = lay.prepare_w4(*tensors[:3], None if gs == -1 else tensors[3], gs, layout="tc")
    return tensors, packed, tc


def _check(y: torch.Tensor, x: torch.Tensor, tensors, packed) -> None:
    assert_close(y, gptq_reference(x, *tensors), TOL[x.dtype])
    assert int(packed.locks.abs().sum()) == 0 and float(packed.acc.abs().sum()) == 0, "buffers must stay zeroed"
    assert all(int(a.count_nonzero()) == 0 and int(lk.count_nonzero()) == 0 for kept in gemv._SCRATCH.values()
               for a, lk in kept), "the shared split-K scratch must stay zeroed"


def test_layout_puts_each_row_where_the_docstring_says_and_round_trips() -> None:
    g = torch.Generator().manual_seed(0)
    k, n = 256, 24
    codes = torch.randint(0, 16, (k, n), generator=g)
    q = lay.pack4_rows(codes)
    t = lay.to_tc_layout(q)
    assert t.shape == q.shape and t.dtype == torch.int32 and t.is_contiguous()
    words = t.view(k // 128, n, 16)
    for s in range(k // 128):
        for c in range(16):
            tt, v = divmod(c, 4)
            for j in range(8):
                j2, j1, j0 = j // 4, (j // 2) % 2, j % 2
                row = 128 * s + j2 + 2 * tt + 8 * j0 + 16 * j1 + 32 * v
                assert torch.equal((words[s, :, c] >> (4 * j)) & 0xF, codes[row]), (s, c, j)
    assert torch.equal(lay.from_tc_layout(t), q)


def test_layout_conversions_by_chunks_match_whole(monkeypatch) -> None:
    q = lay.pack4_rows(torch.randint(0, 16, (1280, 24), generator=torch.Generator().manual_seed(1)))
    whole = lay.to_tc_layout(q)
    monkeypatch.setattr(lay, "_CONVERT_CODES", 3 * 128 * 24)  # chunks of 3 steps; the last one holds 1
    assert torch.equal(lay.to_tc_layout(q), whole) and torch.equal(lay.from_tc_layout(whole), q)


def test_layout_choice_and_bad_shapes() -> None:
    tensors, packed = gptq_case(256, 16, 64, act_order=False, seed=1)
    assert packed.layout == "gptq"
    with pytest.raises(ValueError, match="multiples of 128"):  # group 64: a step would hold two groups
        lay.prepare_w4(*tensors[:3], tensors[3], 64, layout="tc")
    with pytest.raises(ValueError, match="layout must be"):
        lay.prepare_w4(*tensors[:3], tensors[3], 64, layout="marlin")
    with pytest.raises(ValueError, match="K a multiple of 128"):
        lay.to_tc_layout(torch.zeros(20, 8, dtype=torch.int32))
    assert lay.tc_layout_fits(4096, 128) and lay.tc_layout_fits(256, 256) and lay.tc_layout_fits(512, 512)
    assert not lay.tc_layout_fits(576, 128) and not lay.tc_layout_fits(4096, 64)
    # a CPU (or interpreted) weight is served in the checkpoint's layout; CUDA picks "tc" where it fits
    q = torch.zeros(4096 // 8, 64, dtype=torch.int32, device=DEVICE)
    compiled = q.is_cuda and not wk.kernels_interpreted()
    assert wk.serving_layout(q, 128) == ("tc" if compiled else "gptq")
    assert wk.serving_layout(q, 64) == "gptq" and wk.serving_layout(q[:72], -1) == "gptq"  # K = 576


@pytest.mark.parametrize("k,n,gs", [(256, 48, 128), (512, 200, 256), (384, 64, -1)])
def test_dequantize_tc_layout_matches_the_reference(k: int, n: int, gs: int) -> None:
    _, packed, tc = _tc_case(k, n, gs, act_order=False, seed=k + n)
    ref = wk.dequantize_w4(packed.qweight, packed.qzeros, packed.scales, packed.group_size, torch.float32)
    got = dq.dequantize_w4(tc.qweight, tc.qzeros, tc.scales, tc.group_size, torch.float32, layout="tc")
    assert torch.equal(got, ref)
    cpu = dq.dequantize_w4(tc.qweight.cpu(), tc.qzeros.cpu(), tc.scales.cpu(), tc.group_size, torch.float32,
                           layout="tc")  # the torch path
    assert torch.equal(cpu, ref.cpu())


@pytest.mark.parametrize("m", [1, 3, 130])
def test_linear_on_a_tc_weight_matches_the_reference_wherever_it_runs(m: int) -> None:
    tensors, _, tc = _tc_case(256, 64, 128, act_order=True, seed=m)
    x = torch.randn(m, 256, device=DEVICE)
    for dtype in (torch.float32, torch.float16):  # fp32 x takes the dequantize path on every device
        xd = x.to(dtype)
        _check(wk.w4a16_linear(xd, tc), xd, tensors, tc)
    with pytest.raises(ValueError, match="tensor-core layout"):
        wk.w4a16_linear(x.half(), tc, gemv=wk.default_gemv_config(1, 64, 256))


def test_scales_off_a_4_byte_boundary_take_the_dequantize_path() -> None:
    """The tensor-core step reads scales as 4-byte pairs: a weight whose scales start mid-pair is not its."""
    tensors, _, tc = _tc_case(256, 64, 128, act_order=False, seed=7)
    buf = torch.empty(tc.scales.numel() + 1, dtype=tc.scales.dtype, device=tc.scales.device)
    odd = buf[1:].view_as(tc.scales)
    odd.copy_(tc.scales)
    tc_odd = dataclasses.replace(tc, scales=odd)
    x = torch.randn(3, 256, device=DEVICE).half()
    assert not tcl.tcl_usable(x, tc_odd)
    assert tcl.tcl_usable(x, tc) == (DEVICE == "cuda" or tcl.kernels_interpreted())
    _check(wk.w4a16_linear(x, tc_odd), x, tensors, tc_odd)
    with pytest.raises(ValueError, match="4-byte-aligned scales"):
        tcl.w4a16_tcl(x, tc_odd)


def test_kernel_entry_points_refuse_what_they_cannot_serve() -> None:
    _, packed, tc = _tc_case(256, 64, 128, act_order=False, seed=5)
    x = torch.randn(2, 256, device=DEVICE).half()
    with pytest.raises(ValueError, match="'tc'-layout weights"):
        tcl.w4a16_tcl(x, packed)  # a GPTQ-layout weight
    if not tcl.tcl_usable(x, tc):  # CPU without the interpreter
        with pytest.raises(ValueError, match="w4a16_tcl needs"):
            tcl.w4a16_tcl(x, tc)
    with pytest.raises(ValueError, match="w4a16_tcl needs"):
        tcl.w4a16_tcl(x.float(), tc)  # fp32 x: the dequantize path's (w4a16_linear)
    for bad in ({"block_m": 8}, {"block_n": 32, "num_warps": 4}, {"num_warps": 3}, {"num_stages": 0}):
        with pytest.raises(ValueError):
            tcl.TclConfig(**bad)
    assert [tcl.tcl_config(m).block_m for m in (2, 16, 17, 32, 33, 64, 65, 128, 129, 256)] == [
        16, 16, 32, 32, 64, 64, 64, 64, 128, 128]
    assert tcl.tcl_config(128, 11008).block_m == 64  # wide N keeps 64-row tiles
    assert tcl.tcl_config(192, 11008) == tcl.TclConfig(64, 128, 4, 3, 2)  # three row tiles in one wave
    assert [tcl.tcl_config(m).block_n for m in (8, 9, 16)] == [64, 128, 128]  # 128 columns at 9..16 rows
    assert 5 <= tcl.TC_PRELOAD_MAX_M < 17  # the M = 5 and 17 cases below run the peeled and the plain loop
    assert [tcl.tcl_config(m, 4096, 11008).block_m for m in (96, 128)] == [128, 128]  # long K: one 128-row tile
    assert [tcl.tcl_config(192, 4096, k).programs_per_sm for k in (4096, 11008)] == [1, 2]  # long K splits more


@pytest.mark.parametrize("m,dtype,act_order", [(1, torch.float16, True), (1, torch.bfloat16, False),
                                                (5, torch.bfloat16, False), (17, torch.float16, True),
                                                (40, torch.bfloat16, True)])
def test_kernels_match_reference_on_any_device(m: int, dtype: torch.dtype, act_order: bool) -> None:
    """Small shapes, every split and relabel path (under the interpreter on CPU: ``PTX`` off, the same layout
    math): 2 steps of K, N not a multiple of the tile, 4- and 8-warp relabels, split-K and none (the last config:
    one program runs both steps, so the peeled first step of the M = 1 GEMV and of the tensor-core step up to
    ``TC_PRELOAD_MAX_M`` rows, M = 5 here, and the loop after it both run)."""
    tensors, _, tc = _tc_case(256, 200, 128, act_order, seed=m)
    x = torch.randn(m, 256, device=DEVICE).to(dtype)
    _check(tcl.w4a16_tcl(x, tc), x, tensors, tc)
    for cfg in (tcl.TclConfig(16, 64, 4, 2, 8), tcl.TclConfig(32, 128, 8, 2, 1), tcl.TclConfig(64, 64, 4, 2, 1),
                tcl.TclConfig(16, 64, 4, 1, 0.01)):
        out = torch.full((m, 200), float("nan"), device=DEVICE, dtype=dtype)
        _check(tcl.w4a16_tcl(x, tc, out=out, config=cfg), x, tensors, tc)


@pytest.mark.parametrize("m", [1, 8, 33])
def test_group_matches_reference_on_any_device(m: int) -> None:
    cases = [_tc_case(256, n, 128, act_order=False, seed=n + m) for n in (128, 64, 72)]
    x = torch.randn(m, 256, device=DEVICE).half()
    for cfg in (None, tcl.TclConfig(64 if m > 32 else 16, 64, 4, 2, 4)):
        for y, (tensors, _, tc) in zip(tcl.w4a16_tcl_group(x, [c[2] for c in cases], cfg), cases):
            _check(y, x, tensors, tc)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "k,n,gs,act_order,m,dtype",
    [
        (4096, 4096, 128, False, 1, torch.float16),
        (4096, 11008, 128, True, 1, torch.bfloat16),
        (11008, 4096, 128, False, 2, torch.float16),
        (4096, 4096, 128, True, 5, torch.bfloat16),
        (1024, 4096, 256, False, 16, torch.float16),  # two steps per group
        (512, 200, -1, True, 1, torch.float16),  # one group per column; N not a multiple of the tile
        (512, 200, -1, True, 17, torch.bfloat16),
        (4096, 11008, 128, False, 32, torch.float16),
        (11008, 4096, 128, True, 64, torch.bfloat16),
        (4096, 4096, 128, False, 100, torch.float16),  # two row tiles, the second partial
        (4096, 4096, 128, True, 128, torch.float16),
        (4096, 4096, 128, False, 200, torch.bfloat16),  # one 128-row tile and a partial one
        (4096, 11008, 128, True, 256, torch.float16),  # four 64-row tiles
        (4096, 4096, 128, False, 257, torch.float16),  # above TCL_MAX_M: dequantize + matmul
    ],
)
def test_gpu_matches_reference(k: int, n: int, gs: int, act_order: bool, m: int, dtype: torch.dtype) -> None:
    tensors, _, tc = _tc_case(k, n, gs, act_order, seed=k + n + m)
    for _ in range(3):  # later calls reuse the semaphores and the fp32 buffer the first left zeroed
        x = torch.randn(m, k, device="cuda").to(dtype)
        if m <= tcl.TCL_MAX_M:
            out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
            y = tcl.w4a16_tcl(x, tc, out=out)
            assert y.data_ptr() == out.data_ptr()
            _check(y, x, tensors, tc)
        _check(wk.w4a16_linear(x, tc), x, tensors, tc)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 40])
def test_gpu_configs_and_splits(m: int) -> None:
    tensors, _, tc = _tc_case(4096, 4096, 128, act_order=True, seed=m)
    for cfg in (tcl.TclConfig(16, 64, 4, 2, 1), tcl.TclConfig(32, 128, 8, 3, 4), tcl.TclConfig(64, 256, 8, 2, 2)):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
        _check(tcl.w4a16_tcl(x, tc, config=cfg), x, tensors, tc)


@pytest.mark.gpu
def test_gpu_m1_fp16_pairs_match_the_reference_and_stay_finite_at_the_fp16_limit() -> None:
    """The M = 1 GEMV's fp16 step (``XPAIRS`` 1: x read as 32-bit pairs, 2**-9 on the weights) against the fp64
    reference: ordinary x; x one element off a 4-byte boundary (``xpairs_ok`` refuses it: the gathering step
    runs); bf16 x (the gathering step); and the overflow bound: the first 128 inputs at 65504 with
    code - zero = -16 there, so each half of a thread's four-word fp16 sum (``_m1_quad``) reaches
    16 * 16 / 512 * 65504 ~ 2**15 and must stay finite (group 0's scales are small so that the output itself
    cannot overflow)."""
    k, n, gs = 4096, 1024, 128
    gen = torch.Generator().manual_seed(11)
    codes = torch.randint(0, 16, (k, n), generator=gen)
    zeros = torch.randint(1, 16, (k // gs, n), generator=gen)
    scales = torch.rand(k // gs, n, generator=gen) * 0.02 + 1e-3
    codes[:gs], zeros[0], scales[0] = 0, 16, 1e-4  # step 0: code - zero = -16 on every word
    qweight = pack_nibbles(codes).cuda()
    qzeros = pack_nibbles((zeros - 1).t().contiguous()).t().contiguous().cuda()
    scales, g_idx = scales.half().cuda(), (torch.arange(k) // gs).to(torch.int32).cuda()
    tc = lay.prepare_w4(qweight, qzeros, scales, g_idx, gs, layout="tc")
    buf = torch.empty(k + 1, device="cuda", dtype=torch.float16)
    for big in (False, True):
        x = torch.randn(1, k, generator=gen)
        if big:
            x[0, :gs] = 65504.0
        ref = gptq_reference(x.half().cuda(), qweight, qzeros, scales, g_idx)
        off = buf[1:].view(1, k).copy_(x.half().cuda())
        for xi, pairs in ((x.half().cuda(), True), (off, False), (x.bfloat16().cuda(), False)):
            assert tcl.xpairs_ok(xi) == pairs
            out = torch.full((1, n), float("nan"), device="cuda", dtype=xi.dtype)
            y = tcl.w4a16_tcl(xi, tc, out=out)
            assert_close(y, ref if xi.dtype == torch.float16 else gptq_reference(xi, qweight, qzeros, scales, g_idx),
                         3e-3 if xi.dtype == torch.float16 else 1e-2)  # also: every element finite


@pytest.mark.parametrize("m", [1, 6])
def test_deferred_cast_hands_back_the_sums_with_the_cast_bits(m: int) -> None:
    """``defer_cast``: a split launch returns ``PendingSums`` (no cast launch) whose finish, ``materialize``, gives
    the plain call's bits and zeroes the sums (the weight's own ``acc`` at M = 1, the stream's scratch above); a
    launch without a split returns the tensor."""
    tensors, _, tc = _tc_case(256, 200, 128, False, seed=11 + m)
    x = torch.randn(m, 256, device=DEVICE).half()
    split = tcl.TclConfig(16, 64, 4, 2, 8)
    plain = tcl.w4a16_tcl(x, tc, config=split)
    pending = tcl.w4a16_tcl(x, tc, config=split, defer_cast=True)
    assert isinstance(pending, gemv.PendingSums) and pending.shape == (m, 200) and pending.dtype == x.dtype
    assert (pending.sums.data_ptr() == tc.acc.data_ptr()) == (m == 1)
    assert int(pending.sums.count_nonzero()) > 0, "the launch left its sums for the caller"
    assert torch.equal(pending.materialize(), plain)
    assert int(pending.sums.count_nonzero()) == 0 and int(tc.acc.count_nonzero()) == 0
    one = tcl.w4a16_tcl(x, tc, config=tcl.TclConfig(16, 64, 4, 1, 0.01), defer_cast=True)
    assert isinstance(one, torch.Tensor)
    _check(one, x, tensors, tc)


@pytest.mark.parametrize("widths", [(40,), (24, 40), (16, 24, 40)])
def test_cast_launch_fills_every_output_and_zeroes_the_sums(widths: tuple[int, ...]) -> None:
    """``w4a16_gemv.cast_sums`` (the tensor-core launches' finish): output j's [M, n_j] sums follow the earlier
    outputs' in the buffer; output 0 may have a wider row stride (a caller's ``out``); every element is written
    in the outputs' dtype, the sums end at 0."""
    m, g = 3, torch.Generator().manual_seed(len(widths))
    total = m * sum(widths)
    ws = torch.randn(total + 7, generator=g).to(DEVICE)  # 7 past the launch's sums: never touched
    tail = ws[total:].clone()
    wide = torch.full((m, widths[0] + 5), float("nan"), device=DEVICE, dtype=torch.float16)
    outs = [wide[:, : widths[0]]] + [torch.full((m, n), float("nan"), device=DEVICE, dtype=torch.float16)
                                     for n in widths[1:]]
    want = ws[:total].clone()
    gemv.cast_sums(ws, outs)
    start = 0
    for out, n in zip(outs, widths):
        assert torch.equal(out, want[start:start + m * n].view(m, n).half())
        start += m * n
    assert torch.isnan(wide[:, widths[0]:]).all(), "the columns past output 0 are not its"
    assert int(ws[:total].count_nonzero()) == 0 and torch.equal(ws[total:], tail)


def test_group_config_says_where_one_launch_pays() -> None:
    assert tcl.tcl_group_config(1, 11008) is not None and tcl.tcl_group_config(8, 4096) is not None
    assert tcl.tcl_group_config(8, 11008) == tcl.TclConfig(16, 128, 4, 3, 2)  # gate/up at a few rows: one launch
    assert tcl.tcl_group_config(8, 4096).num_stages == 3  # not the single weights' stages (session 23 sweep)
    assert tcl.tcl_group_config(32, 11008).block_m == 32 and tcl.tcl_group_config(64, 11008).num_stages == 2
    assert tcl.tcl_group_config(128, 4096) is not None and tcl.tcl_group_config(128, 11008) is None
    assert tcl.tcl_group_config(200, 4096) is None


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16, 32, 64, 100])
def test_gpu_group_matches_separate_calls(m: int) -> None:
    cases = [_tc_case(4096, n, 128, act_order=False, seed=n + m) for n in (4096, 1024, 1024)]
    x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
    ys = tcl.w4a16_tcl_group(x, [c[2] for c in cases])
    for y, (tensors, _, tc) in zip(ys, cases):
        _check(y, x, tensors, tc)
    ys2 = wk.w4a16_linear_group(x, [c[2] for c in cases[:2]], [None, None])  # the dispatcher's group path
    for y, (tensors, _, tc) in zip(ys2, cases[:2]):
        _check(y, x, tensors, tc)


@pytest.mark.gpu
def test_gpu_group_reads_the_norms_half_copy_with_the_gathering_bits() -> None:
    """``x_half`` (the RMSNorm's fp16 x * 2**-7, ``XPAIRS`` 2): a bf16 row's grouped M = 1 launch reads it as pairs
    and gives the gathering step's bits (the same x', the same 2**-9 sums), also with a LoRA shrink in the launch
    (which still reads bf16 x); fp16 x, several rows or a misaligned copy ignore it; act-order weights too (x is
    permuted, its copy is not). One K split (``one``): with three or more split-K partials the order of the
    atomic adds, and so the last bits, can change from launch to launch."""
    cases = [_tc_case(4096, n, 128, act_order=False, seed=n) for n in (2048, 512, 512)]
    packs = [c[2] for c in cases]
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16) * 3
    x[0, :4] = torch.tensor([3e4, -1e-4, 0.0, 7e-3])  # |x'| near the old limits and subnormal
    half = (x.float() * 2**-7).half()
    assert tcl.half_pairs_ok(x, half) and not tcl.half_pairs_ok(x.half(), half)
    assert not tcl.half_pairs_ok(x, torch.empty(4097, device="cuda", dtype=torch.float16)[1:].view(1, 4096))
    one = tcl.TclConfig(16, 128, 4, 1, 0.01)
    plain = tcl.w4a16_tcl_group(x, packs, one)
    lt = kernel_module("lora_sgmv_triton")
    a = (torch.randn(4, 48, 4096, generator=torch.Generator().manual_seed(5)) * 0.1).cuda().bfloat16()
    slots = torch.tensor([2], device="cuda", dtype=torch.int32)
    shrink = lt.LoRAShrink(a, slots)
    for y, want, (tensors, _, tc) in zip(tcl.w4a16_tcl_group(x, packs, one, shrink, half), plain, cases):
        assert torch.equal(y, want)
        _check(y, x, tensors, tc)
    torch.testing.assert_close(shrink.partials, lt.lora_shrink_partials(x, a, slots), rtol=1e-4, atol=1e-4)
    stale = torch.zeros_like(half)  # a copy that is not x's: ignored wherever it does not apply
    for xi in (x.half(), x.expand(3, 4096).contiguous()):
        assert all(torch.equal(a, b) for a, b in zip(tcl.w4a16_tcl_group(xi, packs, one, x_half=stale),
                                                      tcl.w4a16_tcl_group(xi, packs, one)))
    tensors, _, tc = _tc_case(4096, 512, 128, act_order=True, seed=7)  # one weight twice: one permutation
    for y, want in zip(tcl.w4a16_tcl_group(x, [tc, tc], one, x_half=stale), tcl.w4a16_tcl_group(x, [tc, tc], one)):
        assert torch.equal(y, want)
        _check(y, x, tensors, tc)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 48])
def test_gpu_cuda_graph_replay_with_new_inputs(m: int) -> None:
    tensors, _, tc = _tc_case(4096, 4096, 128, act_order=True, seed=11)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
    out = torch.empty(m, 4096, device="cuda", dtype=torch.float16)
    graph = capture_graph(lambda: tcl.w4a16_tcl(x, tc, out=out))
    for _ in range(30):  # replays see fresh inputs: no stale sums, semaphores reset
        x.copy_(torch.randn_like(x))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check(out, x, tensors, tc)


@pytest.mark.parametrize("m,rank,act_order", [(1, 16, False), (5, 16, False), (100, 8, False), (1, 24, False),
                                              (5, 24, False), (1, 96, False), (5, 16, True)])
def test_group_runs_a_lora_shrink_beside_the_weights(m: int, rank: int, act_order: bool) -> None:
    """The grouped launch also runs a ``LoRAShrink`` of the same x (its own programs; at M = 100 two row tiles
    share the shrink's jobs; 3 x 24 rows take two rounds of ``SHRINK_CHUNK_R``): the partials equal
    ``lora_shrink_partials``' and the products are untouched. Stacks over ``SHRINK_MAX_ROWS`` rows (3 x 96) and
    act-order groups (x permuted for the weights) are left to the caller: ``partials`` stays None."""
    lt = kernel_module("lora_sgmv_triton")
    cases = [_tc_case(256, n, 128, act_order=act_order, seed=n + rank) for n in (128, 64, 72)]
    if act_order:  # one shared permutation tensor, so the three weights group (share_input); their products
        # are then not the reference's and go unchecked here
        for c in cases[1:]:
            object.__setattr__(c[2], "perm", cases[0][2].perm)
    g = torch.Generator().manual_seed(rank)
    a = (torch.randn(4, 3 * rank, 256, generator=g) * 0.1).to(DEVICE).half()
    for slot in (2, -1):
        slots = torch.randint(0, 4, (m,), generator=g).to(DEVICE, torch.int32)
        slots[0] = slot
        x = torch.randn(m, 256, device=DEVICE).half()
        shrink = lt.LoRAShrink(a, slots)
        ys = tcl.w4a16_tcl_group(x, [c[2] for c in cases], shrink=shrink)
        for y, (tensors, _, tc) in zip(ys, cases):
            if not act_order:
                _check(y, x, tensors, tc)
        fits = 3 * rank <= tcl.SHRINK_MAX_ROWS and not act_order
        assert (shrink.partials is not None) == fits
        if fits:
            want = lt.lora_shrink_partials(x, a, slots)
            assert shrink.partials.shape == want.shape
            torch.testing.assert_close(shrink.partials, want, rtol=1e-5, atol=1e-5)
            assert (slot == -1) == (float(shrink.partials[:, 0].abs().max()) == 0.0)


@pytest.mark.parametrize("m,rows", [(1, 16), (5, 64), (100, 16), (5, 80), (1, 200), (1, 272)])
def test_single_weight_runs_a_lora_shrink_beside_it(m: int, rows: int) -> None:
    """``w4a16_tcl`` takes a ``LoRAShrink`` too (o_proj, down_proj): same partials as ``lora_shrink_partials``
    (80 and 200 rows: in rounds of 64), products untouched; over ``SHRINK_MAX_ROWS`` (272 rows) the offer is left
    to the caller."""
    lt = kernel_module("lora_sgmv_triton")
    tensors, _, tc = _tc_case(256, 200, 128, act_order=False, seed=m + rows)
    g = torch.Generator().manual_seed(m)
    a = (torch.randn(3, rows, 256, generator=g) * 0.1).to(DEVICE).half()
    slots = torch.randint(-1, 3, (m,), generator=g).to(DEVICE, torch.int32)
    x = torch.randn(m, 256, device=DEVICE).half()
    shrink = lt.LoRAShrink(a, slots)
    _check(tcl.w4a16_tcl(x, tc, shrink=shrink), x, tensors, tc)
    if rows > tcl.SHRINK_MAX_ROWS:
        assert shrink.partials is None
    else:
        torch.testing.assert_close(shrink.partials, lt.lora_shrink_partials(x, a, slots), rtol=1e-5, atol=1e-5)


def _swiglu_inputs(m: int, k: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(m, k, generator=g) * 3).to(DEVICE, dtype)  # past silu's bend on both sides
    return gate, torch.randn(m, k, generator=g).to(DEVICE, dtype)


@pytest.mark.parametrize("m,dtype,act_order,store", [(1, torch.float16, False, True), (1, torch.bfloat16, False, False),
                                                     (1, torch.float16, True, True), (3, torch.bfloat16, False, True)])
def test_swiglu_input_reads_silu_mul_bits(m: int, dtype: torch.dtype, act_order: bool, store: bool) -> None:
    """``w4a16_tcl(gate, swiglu=SwiGLU(up, h))`` multiplies by ``silu_mul(gate, up)``: at M = 1 without act-order
    the launch computes the product as it loads x, elsewhere it materializes it first; ``h`` gets the product
    either way. One K split (deterministic sums) is compared bit for bit with the two-launch path."""
    sm = kernel_module("silu_mul")
    tensors, _, tc = _tc_case(256, 200, 128, act_order, seed=m + 7)
    gate, up = _swiglu_inputs(m, 256, dtype, seed=m)
    # the launch's product is the kernel's math; a materialized one is silu_mul's (the torch reference on CPU)
    want = (sm.silu_mul_triton if m == 1 and not act_order else sm.silu_mul)(gate, up)
    one = tcl.TclConfig(16, 64, 4, 1, 0.01)  # split 1
    h = torch.full_like(gate, float("nan")) if store else None
    y = tcl.w4a16_tcl(gate, tc, config=one, swiglu=sm.SwiGLU(up, h))
    assert torch.equal(y, tcl.w4a16_tcl(want, tc, config=one))
    assert h is None or torch.equal(h, want)
    _check(tcl.w4a16_tcl(gate, tc, swiglu=sm.SwiGLU(up)), want, tensors, tc)  # default split-K
    with pytest.raises(ValueError, match="like the gate"):
        tcl.w4a16_tcl(gate, tc, swiglu=sm.SwiGLU(up[:, :128]))


@pytest.mark.parametrize("rows", [16, 80])
def test_swiglu_launch_runs_the_shrink_of_the_product(rows: int) -> None:
    """The shrink programs of a SwiGLU launch read the product too (80 rows: in rounds)."""
    sm, lt = kernel_module("silu_mul"), kernel_module("lora_sgmv_triton")
    tensors, _, tc = _tc_case(256, 200, 128, act_order=False, seed=rows)
    gate, up = _swiglu_inputs(1, 256, torch.float16, seed=rows)
    g = torch.Generator().manual_seed(rows)
    a = (torch.randn(3, rows, 256, generator=g) * 0.1).to(DEVICE).half()
    slots = torch.tensor([1], device=DEVICE, dtype=torch.int32)
    shrink = lt.LoRAShrink(a, slots)
    want = sm.silu_mul_triton(gate, up)
    _check(tcl.w4a16_tcl(gate, tc, shrink=shrink, swiglu=sm.SwiGLU(up)), want, tensors, tc)
    torch.testing.assert_close(shrink.partials, lt.lora_shrink_partials(want, a, slots), rtol=1e-5, atol=1e-5)


def test_swiglu_through_the_dispatcher_on_any_weight() -> None:
    """``w4a16_linear`` takes ``SwiGLU`` for every layout and M: the GPTQ layout and M past ``TCL_MAX_M``
    materialize the product (into ``out`` when set) with ``silu_mul`` (the torch reference on CPU, within an ulp
    of the kernel's interpreted math, which the launch runs)."""
    sm = kernel_module("silu_mul")
    tensors, packed, tc = _tc_case(256, 200, 128, act_order=False, seed=3)
    for m, weight in ((1, tc), (1, packed), (2, packed), (tcl.TCL_MAX_M + 1, tc)):
        gate, up = _swiglu_inputs(m, 256, torch.float16, seed=m)
        h = torch.empty_like(gate)
        want = (sm.silu_mul_triton if m == 1 and weight is tc else sm.silu_mul)(gate, up)
        assert_close(wk.w4a16_linear(gate, weight, swiglu=sm.SwiGLU(up, h)), gptq_reference(want, *tensors),
                     TOL[torch.float16])
        assert torch.equal(h, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_swiglu_down_proj_matches_two_launches(dtype: torch.dtype) -> None:
    """The 7B down_proj at M = 1: bit for bit the two-launch result at one K split (bf16; fp16's second launch
    reads x as pairs, so within 2e-3 there), within the reference's bound
    at the default split, the product stored, a rank-16 shrink beside it, and CUDA-graph replays on new inputs."""
    sm, lt = kernel_module("silu_mul"), kernel_module("lora_sgmv_triton")
    tensors, _, tc = _tc_case(11008, 4096, 128, act_order=False, seed=5)
    gate, up = _swiglu_inputs(1, 11008, dtype, seed=5)
    want = sm.silu_mul_triton(gate, up)
    one = tcl.TclConfig(16, 512, 4, 1, 0.01)
    h = torch.full_like(gate, float("nan"))
    fused, two = tcl.w4a16_tcl(gate, tc, config=one, swiglu=sm.SwiGLU(up, h)), tcl.w4a16_tcl(want, tc, config=one)
    if dtype == torch.bfloat16:  # both read the product through the gathering step
        assert torch.equal(fused, two)
    else:  # the second reads fp16 x as pairs (``XPAIRS`` 1): the same sums except where x * 2**-7 was
        assert_close(fused, two, 2e-3)  # subnormal in the gathering step
    assert torch.equal(h, want)
    a = (torch.randn(4, 16, 11008, device="cuda") * 0.05).to(dtype)
    slots = torch.tensor([2], device="cuda", dtype=torch.int32)
    shrink = lt.LoRAShrink(a, slots)
    out = torch.empty(1, 4096, device="cuda", dtype=dtype)
    graph = capture_graph(lambda: tcl.w4a16_tcl(gate, tc, out=out, shrink=shrink, swiglu=sm.SwiGLU(up, h)))
    for i in range(5):
        gate.copy_(torch.randn_like(gate) * 3)
        up.copy_(torch.randn_like(up))
        out.fill_(float("nan"))
        h.fill_(float("nan"))
        graph.replay()
        want = sm.silu_mul_triton(gate, up)
        assert torch.equal(h, want)
        _check(out, want, tensors, tc)
        torch.testing.assert_close(shrink.partials, lt.lora_shrink_partials(want, a, slots), rtol=1e-4, atol=1e-4)
