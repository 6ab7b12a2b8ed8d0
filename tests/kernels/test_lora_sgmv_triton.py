"""Triton multi-LoRA shrink/expand (BGMV) vs the torch SGMV reference ``lora_sgmv.lora_apply``.

Runs under ``TRITON_INTERPRET=1`` on CPU at tiny shapes, compiled on CUDA, plus
a ``gpu`` test at Llama-2-7B projection shapes with 32 distinct adapters.
"""

from __future__ import annotations

import pytest
import torch
from triton_setup import (  # skips the module without triton
    DEVICE,
    TOL,
    assert_close,
    kernel_module,
)

from inlaid.kernels import lora_sgmv

lk = kernel_module("lora_sgmv_triton")


def _stacks(s: int, r: int, d_in: int, d_out: int, dtype: torch.dtype, seed: int):
    """Random adapters of ranks 1..r zero-padded to r (like LoRAPool), one empty slot."""
    g = torch.Generator().manual_seed(seed)
    a = torch.zeros(s, r, d_in)
    b = torch.zeros(s, d_out, r)
    for slot in range(s - 1):
        rank = 1 + (slot * 5) % r
        a[slot, :rank] = torch.randn(rank, d_in, generator=g) / d_in**0.5
        b[slot, :, :rank] = torch.randn(d_out, rank, generator=g)
    scal = torch.rand(s, generator=g) + 0.5
    scal[-1] = 0.0
    return a.to(DEVICE, dtype), b.to(DEVICE, dtype), scal.to(DEVICE)


def _reference(x, out, a, b, scal, slots) -> torch.Tensor:
    ref = out.double().clone()
    return lora_sgmv.lora_apply(x.double(), ref, a.double(), b.double(), scal.double(),
                                lora_sgmv.build_segments(slots))


@pytest.mark.parametrize("dtype,splits", [(torch.float32, 1), (torch.float16, 3), (torch.bfloat16, None),
                                          (torch.float16, 24)])  # 24: many splits, most of them empty
def test_apply_matches_sgmv_reference(dtype: torch.dtype, splits) -> None:
    s, r, d_in, d_out, t = 5, 8, 200, 144, 9  # d_in/d_out not multiples of the blocks
    a, b, scal = _stacks(s, r, d_in, d_out, dtype, seed=t + (splits or 0))
    x = torch.randn(t, d_in, device=DEVICE).to(dtype)
    out = torch.randn(t, d_out, device=DEVICE).to(dtype)
    slots = torch.tensor([2, -1, 0, 2, 4, 1, -1, 3, 0], device=DEVICE)
    ref = _reference(x, out, a, b, scal, slots)
    before = out.clone()
    res = lk.lora_apply_triton(x, out, a, b, scal, slots, num_splits=splits)
    assert res.data_ptr() == out.data_ptr()
    assert_close(out, ref, TOL[dtype])
    untouched = slots < 0
    assert torch.equal(out[untouched], before[untouched]), "rows with slot -1 must be left untouched"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_expand_finishes_pending_sums(dtype: torch.dtype) -> None:
    """The expand over a base launch's uncast sums (``PendingSums``): every row, slot -1 too, gets the cast's
    rounding plus its delta (the same bits as ``cast_sums`` then the expand), in a new tensor; the sums end at 0."""
    gemv = kernel_module("w4a16_gemv")
    s, r, d_in, d_out, t = 5, 8, 200, 144, 6
    a, b, scal = _stacks(s, r, d_in, d_out, dtype, seed=17)
    slots = torch.tensor([2, -1, 0, 4, -1, 1], device=DEVICE)
    y = lk.lora_shrink_partials(torch.randn(t, d_in, device=DEVICE).to(dtype), a, slots)
    sums = (torch.randn(t, d_out) * 3).to(DEVICE)
    cast = torch.empty(t, d_out, device=DEVICE, dtype=dtype)
    gemv.cast_sums(sums.clone(), [cast])
    want = lk.lora_expand(y, b, scal, slots, cast.clone())
    got = lk.lora_expand(y, b, scal, slots, gemv.PendingSums(sums, dtype))
    assert torch.equal(got, want) and torch.equal(got[slots < 0], cast[slots < 0])
    assert int(sums.count_nonzero()) == 0


@pytest.mark.parametrize("r", [16, 80])  # 80: a 128-row tile, the last 48 rows masked
def test_shrink_writes_every_element(monkeypatch: pytest.MonkeyPatch, r: int) -> None:
    s, d_in, t = 3, 300, 6
    a, _, _ = _stacks(s, r, d_in, 8, torch.float32, seed=1)
    x = torch.randn(t, d_in, device=DEVICE)
    slots = torch.tensor([0, -1, 2, 1, 1, 0], device=DEVICE, dtype=torch.int32)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *sz, **kw: real_empty(*sz, **kw).fill_(float("nan")))
    y = lk.lora_shrink(x, a, slots, num_splits=2)
    monkeypatch.undo()
    ref = torch.einsum("ti,tri->tr", x.double(), a.double()[slots.long().clamp(min=0)])
    ref[slots < 0] = 0.0
    assert y.shape == (t, r) and y.dtype == torch.float32
    assert_close(y, ref, 1e-5)


def test_bad_inputs_raise_value_error() -> None:
    a, b, scal = _stacks(3, 4, 32, 16, torch.float32, seed=2)
    x = torch.randn(2, 32, device=DEVICE)
    out = torch.zeros(2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="token_slots"):
        lk.lora_apply_triton(x, out, a, b, scal, torch.tensor([0, 1, 2], device=DEVICE))
    with pytest.raises(ValueError, match="share in"):
        lk.lora_apply_triton(torch.randn(2, 31, device=DEVICE), out, a, b, scal, torch.tensor([0, 1], device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        lk.lora_apply_triton(x.half(), out, a, b, scal, torch.tensor([0, 1], device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("rank", [16, 64])
@pytest.mark.parametrize("d_in,d_out", [(4096, 4096), (4096, 11008), (11008, 4096)])
def test_gpu_llama_shapes_32_adapters(rank: int, d_in: int, d_out: int) -> None:
    a, b, scal = _stacks(33, rank, d_in, d_out, torch.float16, seed=rank)
    for t in (1, 32, 256):
        x = torch.randn(t, d_in, device=DEVICE, dtype=torch.float16)
        out = torch.randn(t, d_out, device=DEVICE, dtype=torch.float16)
        slots = torch.randint(-1, 33, (t,), device=DEVICE)
        ref = _reference(x, out, a, b, scal, slots)
        assert_close(lk.lora_apply_triton(x, out, a, b, scal, slots), ref, 1e-2)


def test_default_num_splits_fills_the_gpu_at_decode_batches() -> None:
    assert lk.default_num_splits(32, 4096) == 16  # 32 tokens x 16 splits = 512 programs, ~4 per SM
    assert lk.default_num_splits(32, 11008) == 17 and lk.default_num_splits(1, 11008) == 32
    assert lk.default_num_splits(256, 4096) == 3 and lk.default_num_splits(9, 200) == 1
