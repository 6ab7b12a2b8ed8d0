"""Segmented (SGMV) multi-LoRA Triton kernels vs the torch reference ``lora_sgmv.lora_apply``.

Runs under the Triton CPU interpreter (small shapes) and on CUDA (``gpu``: prefill-sized shapes). Fresh random
inputs; ``out`` starts from random values (the op adds in place) and every row is compared, including rows of
tokens without an adapter (must stay untouched) and segments longer than one tile.
"""

from __future__ import annotations

import pytest
import torch
from triton_setup import DEVICE, kernel_module  # skips the module without triton

from inlaid.kernels.lora_sgmv import build_segments, lora_apply

lst = kernel_module("lora_segment_triton")


def _case(t: int, s: int, r: int, d_in: int, d_out: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d_in, generator=g).to(DEVICE, dtype)
    out = torch.randn(t, d_out, generator=g).to(DEVICE, dtype)
    a = (torch.randn(s, r, d_in, generator=g) * 0.1).to(DEVICE, dtype)
    b = (torch.randn(s, d_out, r, generator=g) * 0.1).to(DEVICE, dtype)
    a[1, r // 2 :] = 0  # a lower-rank adapter zero-padded to R (the pool's layout)
    b[1, :, r // 2 :] = 0
    sc = (torch.rand(s, generator=g) + 0.5).to(DEVICE)
    slots = torch.randint(-1, s, (t,), generator=g)
    slots[: min(t, 40)] = 2  # one run longer than a tile (contiguous), the rest scattered
    return x, out, a, b, sc, slots.to(DEVICE)


def _check(t: int, s: int, r: int, d_in: int, d_out: int, dtype: torch.dtype, seed: int) -> None:
    x, out, a, b, sc, slots = _case(t, s, r, d_in, d_out, dtype, seed)
    seg = build_segments(slots)
    ref = lora_apply(x.float(), out.float().clone(), a.float(), b.float(), sc.float(), seg)
    tiles = lst.segment_tiles(seg.starts, seg.slots, x.device)
    got = lst.lora_apply_segments(x, out.clone(), a, b, sc, seg.token_order, tiles)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    err = (got.float() - ref).abs().max().item()
    assert err <= tol * ref.abs().max().item(), err
    untouched = slots < 0
    assert torch.equal(got[untouched], out[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_segments_match_reference_small(dtype: torch.dtype) -> None:
    _check(t=75, s=4, r=16, d_in=96, d_out=80, dtype=dtype, seed=1)


def test_segment_tiles_cover_every_segment_once() -> None:
    tiles = lst.segment_tiles((0, 70, 71, 100), (3, 0, 5), torch.device("cpu"), block_t=32)
    assert tiles.tolist() == [[0, 32, 64, 70, 71], [32, 32, 6, 1, 29], [3, 3, 3, 0, 5]]
    assert lst.segment_tiles((0,), (), torch.device("cpu")).shape == (3, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("r", [8, 64])
def test_segments_match_reference_prefill_shapes(dtype: torch.dtype, r: int) -> None:
    _check(t=1500, s=24, r=r, d_in=4096, d_out=4096, dtype=dtype, seed=r)
    _check(t=700, s=8, r=r, d_in=4096, d_out=11008, dtype=dtype, seed=r + 1)
