"""Triton paged decode attention vs the torch reference ``paged_attention.paged_attention``.

Runs under ``TRITON_INTERPRET=1`` on CPU at tiny shapes, compiled on CUDA, plus
a ``gpu`` test at Llama-2-7B (MHA) and GQA shapes with long contexts.
"""

from __future__ import annotations

import pytest
import torch
from triton_setup import (  # skips the module without triton
    DEVICE,
    HAS_CUDA,
    assert_close,
    kernel_module,
)

from inlaid.kernels import paged_attention as ref_mod

pk = kernel_module("paged_attention_triton")
rk = kernel_module("rotary_kv")
TOL = {torch.float32: 5e-3 if HAS_CUDA else 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _setup(seq_lens: list[int], heads: int, kv_heads: int, head_dim: int, block_size: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    b = len(seq_lens)
    max_blocks = -(-max(seq_lens) // block_size)
    num_blocks = b * max_blocks + 3
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    tables = torch.randperm(num_blocks, generator=g)[: b * max_blocks].reshape(b, max_blocks).to(torch.int32)
    q = torch.randn(b, heads, head_dim, generator=g).to(DEVICE, dtype)
    return q, cache, tables.to(DEVICE), torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)


def _reference(q, cache, tables, seq_lens, scale, window) -> torch.Tensor:
    b = q.shape[0]
    qsl = torch.arange(b + 1, dtype=torch.int32, device=q.device)
    return ref_mod.paged_attention(q.double(), cache.double(), tables, seq_lens, qsl, 1,
                                   int(seq_lens.max()), scale, sliding_window=window)


@pytest.mark.parametrize(
    "dtype,heads,kv_heads,block_size,splits,window,bound",
    [
        (torch.float32, 4, 2, 16, 1, None, 70),  # GQA, one partition
        (torch.float16, 2, 2, 8, 3, None, 70),  # MHA, flash-decoding combine
        (torch.bfloat16, 6, 2, 16, 2, 20, 70),  # GQA 3:1, sliding window across partitions
        (torch.float16, 4, 1, 16, None, None, 70),  # MQA, default split heuristic
        (torch.float16, 2, 2, 16, 5, None, 4096),  # a graph's bound far above every context: all 5 partitions
    ],
)
def test_decode_matches_reference(dtype, heads, kv_heads, block_size, splits, window, bound) -> None:
    seq_lens = [1, 17, 40, 70]
    q, cache, tables, lens = _setup(seq_lens, heads, kv_heads, 32, block_size, dtype, seed=heads + block_size)
    scale = 32**-0.5
    out = torch.full_like(q, float("nan"))
    y = pk.paged_decode_attention(q, cache, tables, lens, bound, scale, window, num_splits=splits, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert_close(y, _reference(q, cache, tables, lens, scale, window), TOL[dtype])


def _rope_case(seq_lens: list[int], heads: int, kv_heads: int, head_dim: int, block_size: int, dtype, seed: int):
    """Inputs of a decode step whose new token (position ``len - 1``) is not in the cache yet: unrotated q/k/v,
    cos/sin rows, the new token's slot (row 0 is a CUDA-graph padding row, length 0, slot in a spare block)."""
    q, cache, tables, lens = _setup(seq_lens, heads, kv_heads, head_dim, block_size, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    b = len(seq_lens)
    k = torch.randn(b, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    v = torch.randn(b, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    angles = torch.rand(b, 1, head_dim // 2, generator=g) * 6.3
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(DEVICE, dtype), angles.sin().to(DEVICE, dtype)
    tab = tables.cpu()
    unused = min(set(range(cache.shape[1])) - set(tab.flatten().tolist()))  # _setup leaves 3 blocks out
    slots = [unused * block_size if n == 0 else int(tab[i, (n - 1) // block_size]) * block_size + (n - 1) % block_size
             for i, n in enumerate(seq_lens)]
    return q, k, v, cos, sin, cache, tables, lens, torch.tensor(slots, device=DEVICE), unused


@pytest.mark.parametrize(
    "dtype,heads,kv_heads,head_dim,splits,window",
    [
        (torch.float32, 4, 2, 32, 1, None),  # GQA, one partition
        (torch.float16, 2, 2, 32, 3, None),  # MHA, the newest key in the last busy partition
        (torch.bfloat16, 6, 2, 32, 2, 20),  # GQA 3:1, sliding window
        (torch.float16, 4, 1, 24, 4, None),  # MQA, head_dim 24: masked lanes, rotate_half partner 12 apart
    ],
)
def test_decode_with_rope_matches_rotary_then_decode(dtype, heads, kv_heads, head_dim, splits, window) -> None:
    seq_lens = [0, 1, 17, 40, 70]
    q, k, v, cos, sin, cache, tables, lens, slots, spare = _rope_case(seq_lens, heads, kv_heads, head_dim, 8, dtype,
                                                                      seed=heads + head_dim)
    ref_cache, got_cache = cache.clone(), cache.clone()
    q_rot, _ = rk.rotary_and_write_kv_ref(q, k, v, cos, sin, ref_cache, slots)
    scale = head_dim**-0.5
    y = pk.paged_decode_attention(q, got_cache, tables, lens, 4096, scale, window, num_splits=splits,
                                  out=torch.full_like(q, float("nan")), rope=pk.DecodeRope(k, v, cos, sin, slots))
    assert torch.equal(y[0], torch.zeros_like(y[0])), "a length-0 row attends nothing"
    assert_close(y[1:], _reference(q_rot[1:], ref_cache, tables[1:], lens[1:], scale, window), TOL[dtype])
    # the new keys land with rotary_kv's bits; the padding row writes nothing (its spare block is untouched)
    keep = torch.ones(cache.shape[1], dtype=torch.bool)
    keep[spare] = False
    assert torch.equal(got_cache[:, keep], ref_cache[:, keep])
    assert torch.equal(got_cache[:, spare], cache[:, spare])


def test_decode_rope_rejects_bad_shapes() -> None:
    q, k, v, cos, sin, cache, tables, lens, slots, _ = _rope_case([3, 9], 4, 2, 16, 8, torch.float16, seed=2)
    with pytest.raises(ValueError, match="KVH"):
        pk.paged_decode_attention(q, cache, tables, lens, 9, 0.25, rope=pk.DecodeRope(k[:, :1], v, cos, sin, slots))
    with pytest.raises(ValueError, match="slot_mapping"):
        pk.paged_decode_attention(q, cache, tables, lens, 9, 0.25, rope=pk.DecodeRope(k, v, cos, sin, slots[:1]))
    with pytest.raises(ValueError, match="dtype"):
        pk.paged_decode_attention(q, cache, tables, lens, 9, 0.25,
                                  rope=pk.DecodeRope(k, v, cos.float(), sin.float(), slots))


def test_zero_length_rows_give_zeros_and_others_unaffected() -> None:
    q, cache, tables, lens = _setup([0, 33], 2, 2, 16, 16, torch.float32, seed=9)
    for splits in (1, 2):
        y = pk.paged_decode_attention(q, cache, tables, lens, 33, 0.25, num_splits=splits,
                                      out=torch.full_like(q, float("nan")))
        assert torch.equal(y[0], torch.zeros_like(y[0]))
        assert_close(y[1:], _reference(q[1:], cache, tables[1:], lens[1:], 0.25, None), TOL[torch.float32])


def test_unsplit_max_seq_len_is_the_longest_context_kept_in_one_partition() -> None:
    """The bound CUDA graphs capture short contexts at: the split rule keeps every context up to it whole and
    splits the next one; batches whose (sequence, KV head) programs fill the GPU have no bound (never split)."""
    for num_seqs, kv_heads in ((1, 32), (8, 32), (1, 3), (64, 3), (1, 8), (32, 8)):
        bound = pk.unsplit_max_seq_len(num_seqs, kv_heads)
        assert bound is not None, (num_seqs, kv_heads)
        assert pk.default_num_splits(num_seqs, kv_heads, bound) == 1
        assert pk.default_num_splits(num_seqs, kv_heads, bound + 1) > 1
        assert pk.rope_pays(num_seqs, kv_heads)
    for num_seqs, kv_heads in ((9, 32), (32, 32), (128, 8), (88, 3)):
        assert pk.unsplit_max_seq_len(num_seqs, kv_heads) is None, (num_seqs, kv_heads)
        assert pk.default_num_splits(num_seqs, kv_heads, 1 << 20) == 1
        assert not pk.rope_pays(num_seqs, kv_heads)


def test_bad_inputs_raise_value_error() -> None:
    q, cache, tables, lens = _setup([5, 9], 3, 2, 16, 16, torch.float32, seed=1)
    with pytest.raises(ValueError, match="KVH"):
        pk.paged_decode_attention(q, cache, tables, lens, 9, 0.25)
    q, cache, tables, lens = _setup([5, 9], 4, 2, 16, 16, torch.float32, seed=1)
    with pytest.raises(ValueError, match="seq_lens"):
        pk.paged_decode_attention(q, cache, tables, lens[:1], 9, 0.25)


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads", [(32, 32), (32, 8)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_real_shapes(heads: int, kv_heads: int, dtype) -> None:
    for seq_lens in ([2048], [1, 511, 512, 2048] * 8, [1, 64, 100, 128] * 2):  # the last: the short config
        q, cache, tables, lens = _setup(seq_lens, heads, kv_heads, 128, 16, dtype, seed=len(seq_lens))
        y = pk.paged_decode_attention(q, cache, tables, lens, max(seq_lens), 128**-0.5,
                                      out=torch.full_like(q, float("nan")))
        assert_close(y, _reference(q, cache, tables, lens, 128**-0.5, None), TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads", [(32, 32), (32, 8)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_real_shapes_with_rope(heads: int, kv_heads: int, dtype) -> None:
    for seq_lens, bound in (([0, 2048], 4096), ([1, 511, 512, 2048] * 8, 4096), ([0, 1, 64, 100, 128] * 2, 128)):
        q, k, v, cos, sin, cache, tables, lens, slots, _ = _rope_case(seq_lens, heads, kv_heads, 128, 16, dtype,
                                                                      seed=len(seq_lens))
        ref_cache = cache.clone()
        q_rot, _ = rk.rotary_and_write_kv_triton(q, k, v, cos, sin, ref_cache, slots)
        y = pk.paged_decode_attention(q, cache, tables, lens, bound, 128**-0.5, out=torch.full_like(q, float("nan")),
                                      rope=pk.DecodeRope(k, v, cos, sin, slots))
        busy = lens > 0
        assert_close(y[busy], _reference(q_rot[busy], ref_cache, tables[busy], lens[busy], 128**-0.5, None), TOL[dtype])
        for i in busy.nonzero().flatten().tolist():  # the new keys and values have the standalone kernel's bits
            blk, off = divmod(int(slots[i]), 16)
            assert torch.equal(cache[:, blk, off], ref_cache[:, blk, off])
