"""Paged KV cache and attention over it: the torch reference (CPU and tests).

Owns the KV cache layout and the attention semantics every backend must match.
A later issue adds a Triton kernel next to these functions with the same
signatures; this module imports nothing from ``inlaid``.

Shapes (T = new tokens in the step, B = sequences, H = query heads,
KVH = key/value heads, D = head_dim):

- one layer's cache: ``kv_cache`` [2, num_blocks, block_size, KVH, D];
  ``kv_cache[0]`` holds keys, ``kv_cache[1]`` values. Token slot
  ``s = block_id * block_size + offset``.
- ``q`` [T, H, D]; ``k``, ``v`` [T, KVH, D]; ``slot_mapping`` [T] int64 (>= 0).
- ``block_tables`` [B, max_blocks] int32 (padding entries may hold any valid
  block id: masking is by ``seq_lens``); ``seq_lens`` [B] int32, the context
  length of each sequence *after* this step; ``query_start_loc`` [B+1] int32.

Semantics: the q_len_b = query_start_loc[b+1] - query_start_loc[b] queries of
sequence b are its LAST q_len_b positions, i.e. absolute positions
``seq_lens[b] - q_len_b + i``. Query i attends causally to keys 0..pos (and,
with ``sliding_window=W``, only to keys with ``key > pos - W``, as in HF
Mistral). This covers full prefills, chunked prefills (context already in
cache) and decodes (q_len 1) mixed in one call. GQA: query head h reads KV head
``h // (H // KVH)`` (HF's ``repeat_kv`` grouping).

Invariant: caches are zero-initialised (``allocate_kv_caches``) so masked-out
slots never hold NaN/inf, which would leak through ``0 * NaN`` in softmax @ V.

Per-batch metadata: ``attention_layout`` computes what every layer of one forward shares (each token's
sequence and row, the padded mask); passing it as ``layout=`` skips recomputing it per layer (a prefill step
of a 32-layer model ran those ~25 ops 32 times). Same result either way.

Fresh prefill of one sequence (``fresh_prefill_attention``): when the step holds a single sequence with no
cached context (its T tokens are the whole sequence), the keys and values in the cache are exactly the step's
own k and v, so attention needs no gather, padding or mask: causal SDPA on q, k, v directly.

Cost note: the reference pads queries to [B, max_query_len] and keys to
[B, max_seq_len]; memory is O(B * max_query_len * max_seq_len) for the mask,
fine for CPU and tests, not for large mixed GPU batches (the Triton kernel's job).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def kv_cache_shape(num_blocks: int, block_size: int, kv_heads: int, head_dim: int) -> tuple[int, int, int, int, int]:
    """Shape of one layer's paged KV cache: [2, num_blocks, block_size, kv_heads, head_dim]."""
    for name, value in (("num_blocks", num_blocks), ("block_size", block_size), ("kv_heads", kv_heads), ("head_dim", head_dim)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    return (2, num_blocks, block_size, kv_heads, head_dim)


def allocate_kv_caches(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> list[torch.Tensor]:
    """One zero-filled cache tensor per layer (see ``kv_cache_shape``)."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    shape = kv_cache_shape(num_blocks, block_size, kv_heads, head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store k, v [T, KVH, D] at flat slots ``slot_mapping`` [T] of ``kv_cache`` (in place)."""
    _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, kv_heads, head_dim)
    slots = slot_mapping.long()
    flat[0].index_copy_(0, slots, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slots, v.to(kv_cache.dtype))


def _query_layout(query_start_loc: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token: its sequence index and its row within that sequence's queries; plus q_lens [B]."""
    qsl = query_start_loc.long()
    q_lens = qsl[1:] - qsl[:-1]
    num_seqs = q_lens.shape[0]
    seq_idx = torch.repeat_interleave(
        torch.arange(num_seqs, device=qsl.device), q_lens, output_size=num_tokens
    )
    row = torch.arange(num_tokens, device=qsl.device) - qsl[seq_idx]
    return seq_idx, row, q_lens


def _gather_kv(kv_cache: torch.Tensor, block_tables: torch.Tensor, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of every sequence, padded: two [B, KVH, L, D] tensors, L = max_seq_len."""
    block_size = kv_cache.shape[2]
    n_blocks = -(-max_seq_len // block_size)
    blocks = block_tables[:, :n_blocks].long()
    num_seqs = blocks.shape[0]
    k = kv_cache[0][blocks].reshape(num_seqs, n_blocks * block_size, *kv_cache.shape[3:])
    v = kv_cache[1][blocks].reshape(num_seqs, n_blocks * block_size, *kv_cache.shape[3:])
    return k[:, :max_seq_len].transpose(1, 2), v[:, :max_seq_len].transpose(1, 2)


def _attention_mask(
    seq_lens: torch.Tensor, q_lens: torch.Tensor, max_query_len: int, max_seq_len: int, sliding_window: int | None
) -> torch.Tensor:
    """Boolean [B, 1, max_query_len, max_seq_len]: True where query row i may read key j."""
    device = seq_lens.device
    seq_lens = seq_lens.long()
    rows = torch.arange(max_query_len, device=device)
    keys = torch.arange(max_seq_len, device=device)
    q_pos = (seq_lens - q_lens)[:, None] + rows[None, :]  # [B, Lq]
    mask = keys[None, None, :] <= q_pos[:, :, None]
    mask &= keys[None, None, :] < seq_lens[:, None, None]
    if sliding_window is not None:
        mask &= keys[None, None, :] > (q_pos[:, :, None] - sliding_window)
    return mask[:, None]


@dataclass(frozen=True)
class AttentionLayout:
    """What ``paged_attention`` derives from the batch alone (shared by every layer of one forward)."""

    seq_idx: torch.Tensor
    """[T] int64: each token's sequence."""
    row: torch.Tensor
    """[T] int64: each token's row within its sequence's queries."""
    mask: torch.Tensor
    """[B, 1, max_query_len, max_seq_len] bool: query row i may read key j."""
    num_tokens: int
    sliding_window: int | None


def attention_layout(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int, max_query_len: int,
                     max_seq_len: int, sliding_window: int | None = None) -> AttentionLayout:
    """The batch-only part of ``paged_attention`` for these arguments (pass it as ``layout=``)."""
    seq_idx, row, q_lens = _query_layout(query_start_loc, num_tokens)
    mask = _attention_mask(seq_lens, q_lens, max_query_len, max_seq_len, sliding_window)
    return AttentionLayout(seq_idx, row, mask, num_tokens, sliding_window)


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    sliding_window: int | None = None,
    layout: AttentionLayout | None = None,
) -> torch.Tensor:
    """Causal attention of q [T, H, D] over the paged cache; returns [T, H, D] in q's dtype.

    The new tokens' K/V must already be in the cache (``write_kv`` first).
    Batched over sequences: no Python loop per sequence. ``layout``: ``attention_layout`` of the same batch
    arguments and window (computed here when None).
    """
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = kv_cache.shape[3]
    if num_heads % kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({kv_heads})")
    if layout is None:
        layout = attention_layout(query_start_loc, seq_lens, num_tokens, max_query_len, max_seq_len, sliding_window)
    elif layout.num_tokens != num_tokens or layout.sliding_window != sliding_window:
        raise ValueError(f"layout was built for {layout.num_tokens} tokens, window {layout.sliding_window}; "
                         f"got {num_tokens} tokens, window {sliding_window}")
    seq_idx, row, mask = layout.seq_idx, layout.row, layout.mask
    num_seqs = mask.shape[0]
    q_pad = q.new_zeros(num_seqs, max_query_len, num_heads, head_dim)
    q_pad[seq_idx, row] = q
    k, v = _gather_kv(kv_cache, block_tables, max_seq_len)
    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2), k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale,
        enable_gqa=num_heads != kv_heads,
    )  # [B, H, Lq, D]
    return out.transpose(1, 2)[seq_idx, row]


def fresh_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of one sequence's first T tokens over themselves: q [T, H, D], k and v [T, KVH, D] (the
    K/V just written to the cache); returns [T, H, D]. Equals ``paged_attention`` for a one-sequence batch whose
    ``seq_lens`` is T (no sliding window shorter than T)."""
    num_heads, kv_heads = q.shape[1], k.shape[1]
    if num_heads % kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({kv_heads})")
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None].to(q.dtype), v.transpose(0, 1)[None].to(q.dtype),
        is_causal=True, scale=scale, enable_gqa=num_heads != kv_heads,
    )  # [1, H, T, D]
    return out[0].transpose(0, 1)
