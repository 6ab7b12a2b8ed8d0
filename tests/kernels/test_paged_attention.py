"""The paged-attention reference against a plain per-sequence float64 attention."""

from __future__ import annotations

import math

import pytest
import torch

from inlaid.kernels.paged_attention import (
    allocate_kv_caches,
    attention_layout,
    fresh_prefill_attention,
    kv_cache_shape,
    paged_attention,
    write_kv,
)

H, KVH, D, BS = 4, 2, 8, 4


def _naive(q, k, v, q_start, sliding_window=None):
    """q [Lq, H, D] at absolute positions q_start.. over k, v [L, KVH, D], float64."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / math.sqrt(q.shape[-1])
    qpos = torch.arange(q.shape[0])[:, None] + q_start
    kpos = torch.arange(k.shape[0])[None, :]
    allowed = kpos <= qpos
    if sliding_window is not None:
        allowed &= kpos > qpos - sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _run_case(seq_specs, sliding_window=None, seed=0, shared_layout=False):
    """seq_specs: list of (context_len_before, q_len). Blocks are shuffled, non-contiguous."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 64
    cache = allocate_kv_caches(1, num_blocks, BS, KVH, D, torch.float32, "cpu")[0]
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables, full_k, full_v, qs, slots = [], [], [], [], []
    for ctx, qlen in seq_specs:
        total = ctx + qlen
        blocks = [free.pop() for _ in range(-(-total // BS))]
        tables.append(blocks)
        k = torch.randn(total, KVH, D, generator=gen)
        v = torch.randn(total, KVH, D, generator=gen)
        full_k.append(k)
        full_v.append(v)
        seq_slots = torch.tensor([blocks[p // BS] * BS + p % BS for p in range(total)])
        write_kv(k[:ctx], v[:ctx], cache, seq_slots[:ctx])  # context from earlier steps
        slots.append(seq_slots[ctx:])
        qs.append(torch.randn(qlen, H, D, generator=gen))
    new_k = torch.cat([k[ctx:] for k, (ctx, _) in zip(full_k, seq_specs)])
    new_v = torch.cat([v[ctx:] for v, (ctx, _) in zip(full_v, seq_specs)])
    write_kv(new_k, new_v, cache, torch.cat(slots))
    max_blocks = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32)
    q_lens = [q for _, q in seq_specs]
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    seq_lens = torch.tensor([c + q for c, q in seq_specs], dtype=torch.int32)
    q = torch.cat(qs)
    layout = (attention_layout(qsl, seq_lens, q.shape[0], max(q_lens), int(seq_lens.max()), sliding_window)
              if shared_layout else None)  # fmt: skip
    out = paged_attention(
        q, cache, block_tables, seq_lens, qsl, max(q_lens), int(seq_lens.max()),
        1 / math.sqrt(D), sliding_window=sliding_window, layout=layout,
    )
    ref = torch.cat([
        _naive(q, k, v, ctx, sliding_window) for q, k, v, (ctx, _) in zip(qs, full_k, full_v, seq_specs)
    ])
    return out, ref


@pytest.mark.parametrize(
    "specs",
    [
        [(0, 7)],  # one prefill
        [(0, 5), (0, 9), (0, 1)],  # prefills of different lengths
        [(6, 1), (13, 1), (3, 1)],  # decodes
        [(0, 6), (9, 1), (5, 4), (11, 1)],  # mixed: prefill, decode, chunked prefill
    ],
)
def test_matches_naive(specs):
    out, ref = _run_case(specs)
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t, kv_heads", [(1, KVH), (9, KVH), (16, H)])
def test_fresh_prefill_attention_matches_the_paged_path_and_naive(t: int, kv_heads: int) -> None:
    """One sequence, no cached context: causal SDPA on the step's own k, v equals the paged reference."""
    gen = torch.Generator().manual_seed(t)
    q = torch.randn(t, H, D, generator=gen)
    k, v = torch.randn(t, kv_heads, D, generator=gen), torch.randn(t, kv_heads, D, generator=gen)
    cache = allocate_kv_caches(1, 8, BS, kv_heads, D, torch.float32, "cpu")[0]
    blocks = [5, 2, 7, 0][: -(-t // BS)]
    write_kv(k, v, cache, torch.tensor([blocks[p // BS] * BS + p % BS for p in range(t)]))
    paged = paged_attention(q, cache, torch.tensor([blocks], dtype=torch.int32), torch.tensor([t], dtype=torch.int32),
                            torch.tensor([0, t], dtype=torch.int32), t, t, 1 / math.sqrt(D))
    got = fresh_prefill_attention(q, k, v, 1 / math.sqrt(D))
    assert got.shape == (t, H, D)
    torch.testing.assert_close(got, paged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.double(), _naive(q, k, v, 0), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        fresh_prefill_attention(q, torch.randn(t, 3, D), torch.randn(t, 3, D), 1.0)


def test_sliding_window():
    out, ref = _run_case([(0, 9), (7, 3), (12, 1)], sliding_window=3, seed=1)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # and the window actually changes the result
    out_full, _ = _run_case([(0, 9), (7, 3), (12, 1)], sliding_window=None, seed=1)
    assert not torch.allclose(out, out_full, atol=1e-3)


@pytest.mark.parametrize("window", [None, 3])
def test_precomputed_layout_gives_the_same_result(window):
    """A layout built once per batch (what the model shares across layers) changes nothing, bit for bit."""
    specs = [(0, 6), (9, 1), (5, 4), (11, 1)]
    out, _ = _run_case(specs, sliding_window=window, seed=2)
    shared, _ = _run_case(specs, sliding_window=window, seed=2, shared_layout=True)
    assert torch.equal(out, shared)


def test_layout_for_another_batch_is_refused():
    qsl = torch.tensor([0, 3], dtype=torch.int32)
    lens = torch.tensor([3], dtype=torch.int32)
    cache = allocate_kv_caches(1, 4, BS, KVH, D, torch.float32, "cpu")[0]
    tables = torch.zeros(1, 1, dtype=torch.int32)
    layout = attention_layout(qsl, lens, 3, 3, 3, None)
    with pytest.raises(ValueError, match="window"):
        paged_attention(torch.randn(3, H, D), cache, tables, lens, qsl, 3, 3, 0.3, sliding_window=2, layout=layout)


def test_write_kv_places_slots():
    cache = torch.zeros(kv_cache_shape(3, 2, 1, 1))
    k = torch.tensor([[[1.0]], [[2.0]]])
    write_kv(k, -k, cache, torch.tensor([5, 0]))
    assert cache[0, 2, 1, 0, 0] == 1.0 and cache[0, 0, 0, 0, 0] == 2.0
    assert cache[1, 2, 1, 0, 0] == -1.0 and cache[0].abs().sum() == 3.0


def test_bad_shapes():
    with pytest.raises(ValueError, match="block_size"):
        kv_cache_shape(4, 0, 1, 1)
    cache = torch.zeros(kv_cache_shape(4, 2, 3, 4))
    with pytest.raises(ValueError, match="multiple of KV heads"):
        paged_attention(torch.zeros(1, 4, 4), cache, torch.zeros(1, 1, dtype=torch.int32),
                        torch.tensor([1], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32), 1, 1, 1.0)
