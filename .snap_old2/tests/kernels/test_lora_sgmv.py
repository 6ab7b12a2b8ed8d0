"""SGMV / BGMV torch reference ops against a per-token float64 loop."""

from __future__ import annotations

import pytest
import torch

from inlaid.kernels.lora_sgmv import build_segments, lora_apply, lora_apply_bgmv

S, R, D_IN, D_OUT = 4, 8, 24, 40


def _stacks(dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(S, R, D_IN, generator=g, dtype=torch.float64)
    b = torch.randn(S, D_OUT, R, generator=g, dtype=torch.float64)
    sc = torch.rand(S, generator=g, dtype=torch.float64) + 0.5
    return a.to(dtype), b.to(dtype), sc.to(torch.float32)


def _reference(x, out, a, b, sc, slots):
    """Per-token float64 loop: the obviously-correct definition."""
    ref = out.double().clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            ref[t] += float(sc[s]) * (b[s].double() @ (a[s].double() @ x[t].double()))
    return ref


SLOT_CASES = {
    "interleaved": [0, 2, -1, 2, 0, 3, -1, 1, 1, 0],
    "single_contiguous": [2] * 7,
    "runs": [1, 1, 1, -1, -1, 3, 3, 0],
    "all_none": [-1, -1, -1],
    "one_token": [3],
    "empty": [],
}


@pytest.mark.parametrize("case", sorted(SLOT_CASES))
def test_sgmv_and_bgmv_match_per_token_reference(case: str) -> None:
    slots = torch.tensor(SLOT_CASES[case], dtype=torch.int64)
    a, b, sc = _stacks()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(slots), D_IN, generator=g)
    out0 = torch.randn(len(slots), D_OUT, generator=g)
    ref = _reference(x, out0, a, b, sc, slots)
    got = lora_apply(x, out0.clone(), a, b, sc, build_segments(slots))
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-5)
    got_b = lora_apply_bgmv(x, out0.clone(), a, b, sc, slots)
    torch.testing.assert_close(got_b.double(), ref, atol=1e-4, rtol=1e-5)
    # rows without an adapter are untouched bit for bit
    none = slots < 0
    assert torch.equal(got[none], out0[none])


def test_segments_group_by_slot_and_detect_contiguous_runs() -> None:
    seg = build_segments(torch.tensor([1, 1, 1, -1, 0, 3, 3, 0]))
    assert seg.slots == (0, 1, 3)
    assert seg.starts == (0, 2, 5, 7)
    assert seg.token_order.tolist() == [4, 7, 0, 1, 2, 5, 6]
    assert seg.contiguous == (-1, 0, 5)
    assert seg.num_tokens == 8


def test_padded_rank_is_inert() -> None:
    """Zero-padding A rows / B columns past an adapter's rank does not change the delta."""
    a, b, sc = _stacks()
    a_small, b_small = a[:, :3].contiguous(), b[:, :, :3].contiguous()
    a_pad, b_pad = torch.zeros_like(a), torch.zeros_like(b)
    a_pad[:, :3], b_pad[:, :, :3] = a_small, b_small
    slots = torch.tensor([0, 1, 2, 3, -1, 1])
    g = torch.Generator().manual_seed(2)
    x, out0 = torch.randn(6, D_IN, generator=g), torch.randn(6, D_OUT, generator=g)
    seg = build_segments(slots)
    small = lora_apply(x, out0.clone(), a_small, b_small, sc, seg)
    padded = lora_apply(x, out0.clone(), a_pad, b_pad, sc, seg)
    torch.testing.assert_close(padded, small, atol=1e-5, rtol=1e-5)  # fp32 summation order only


def test_half_precision_close_to_reference() -> None:
    a, b, sc = _stacks(torch.bfloat16)
    slots = torch.tensor([0, 1, -1, 1, 3])
    x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    out0 = torch.zeros(5, D_OUT, dtype=torch.bfloat16)
    got = lora_apply(x, out0.clone(), a, b, sc, build_segments(slots))
    ref = _reference(x, out0, a, b, sc, slots)
    torch.testing.assert_close(got.double(), ref, atol=0.5, rtol=3e-2)


def test_bad_shapes_and_dtypes_raise_value_error() -> None:
    a, b, sc = _stacks()
    seg = build_segments(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="LoRA stacks do not fit"):
        lora_apply(torch.randn(2, D_IN + 1), torch.randn(2, D_OUT), a, b, sc, seg)
    with pytest.raises(ValueError, match="share one dtype"):
        lora_apply(torch.randn(2, D_IN).double(), torch.randn(2, D_OUT), a, b, sc, seg)
    with pytest.raises(ValueError, match="built for 2 tokens"):
        lora_apply(torch.randn(3, D_IN), torch.randn(3, D_OUT), a, b, sc, seg)
    with pytest.raises(ValueError, match="1-D"):
        build_segments(torch.zeros(2, 2, dtype=torch.int64))


@pytest.mark.gpu
def test_sgmv_on_cuda_matches_reference() -> None:
    a, b, sc = (t.cuda() for t in _stacks(torch.float16))
    slots = torch.tensor([0, 2, -1, 2, 0, 3, -1, 1], device="cuda")
    x = torch.randn(8, D_IN, device="cuda", dtype=torch.float16)
    out0 = torch.zeros(8, D_OUT, device="cuda", dtype=torch.float16)
    got = lora_apply(x, out0.clone(), a, b, sc, build_segments(slots))
    ref = _reference(x.cpu(), out0.cpu(), a.cpu(), b.cpu(), sc.cpu(), slots.cpu())
    torch.testing.assert_close(got.double().cpu(), ref, atol=0.2, rtol=2e-2)
