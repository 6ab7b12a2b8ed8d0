"""Paged decode attention (one query token per sequence, GQA): Triton kernel + launcher.

Owns the GPU hot path of serving: every decode step attends one new query per
sequence over that sequence's blocks in the paged KV cache. Semantics, cache
layout and masking are exactly those of the torch reference
``inlaid.kernels.paged_attention.paged_attention`` called with
``query_start_loc = arange(B + 1)`` and ``max_query_len = 1``; this module
imports nothing from ``inlaid`` outside ``inlaid.kernels``.

Shapes: ``q`` [B, H, D]; ``kv_cache`` [2, num_blocks, block_size, KVH, D]
(keys at index 0, values at 1); ``block_tables`` [B, max_blocks] int32;
``seq_lens`` [B] int32 (context length including the new token, whose K/V are
already written). Query head h reads KV head ``h // (H // KVH)``. With
``sliding_window=W`` only keys ``j >= seq_len - W`` are read. A sequence with
``seq_len == 0`` (padding rows of a CUDA-graph batch) gets a zero output.

Kernel: one program per (sequence, KV head, context partition); all H/KVH
query heads of a KV head share each K/V tile load (rows of one ``tl.dot``,
padded to 16). Online softmax in fp32. When B·KVH is too small to fill the GPU
and the context is long, the context is split into partitions whose partial
(max, sum, acc) are combined by a second small kernel (flash-decoding). All
metadata are device tensors of fixed shape and the partition count depends only
on (B, KVH, max_seq_len), so a step is CUDA-graph capturable for a fixed
``max_seq_len`` bound.

Prefill (q_len > 1) is NOT implemented here: it stays on the reference
(``paged_attention``, SDPA over gathered K/V), which is compute-bound and
already uses fused SDPA; a varlen Triton prefill kernel is future work. Why a
hand-written kernel rather than a library: flash-attn / FlashInfer wheels are
tied to exact CUDA/torch builds and do not install from PyPI into CPU or
arbitrary user environments; this kernel needs only ``triton``.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, kernels_interpreted, tl, triton, triton_usable  # noqa: F401 (re-exported)

_NO_WINDOW = 1 << 30


if HAS_TRITON:

    @triton.jit
    def _decode_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, sl_ptr, out_ptr, ws_ml_ptr, ws_acc_ptr,
        scale, window, part_len, QPK, HEAD_DIM, BLOCK_SIZE,
        stride_qb, stride_qh, stride_cb, stride_co, stride_ch, stride_btb, stride_ob, stride_oh,
        BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
        SPLIT: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        part = tl.program_id(2)
        seq_len = tl.load(sl_ptr + b)
        offs_h = tl.arange(0, BLOCK_H)
        heads = kvh * QPK + offs_h
        mask_h = offs_h < QPK
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=mask_h[:, None] & mask_d[None, :], other=0.0)
        start = part * part_len
        end = tl.minimum(start + part_len, seq_len)
        lo = tl.maximum(start, seq_len - window)
        m = tl.full((BLOCK_H,), -1e30, dtype=tl.float32)
        l = tl.zeros((BLOCK_H,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
        for j0 in range(lo, end, BLOCK_T):
            offs_t = j0 + tl.arange(0, BLOCK_T)
            mask_t = offs_t < end
            blk = tl.load(bt_ptr + b * stride_btb + offs_t // BLOCK_SIZE, mask=mask_t, other=0).to(tl.int64)
            row = blk * stride_cb + (offs_t % BLOCK_SIZE) * stride_co + kvh * stride_ch
            kv_mask = mask_t[:, None] & mask_d[None, :]
            k = tl.load(k_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            if DOT_F32:  # CPU interpreter only: its bf16 tl.dot is wrong (triton 3.9)
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
            else:
                s = tl.dot(q, tl.trans(k.to(q.dtype)))
            s = tl.where(mask_t[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            if DOT_F32:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
            m = m_new
        if SPLIT:
            n_parts = tl.num_programs(2)
            ml = ws_ml_ptr + ((b * tl.num_programs(1) + kvh) * QPK + offs_h) * n_parts * 2 + part * 2
            tl.store(ml, m, mask=mask_h)
            tl.store(ml + 1, l, mask=mask_h)
            a_ptrs = ws_acc_ptr + (((b * tl.num_programs(1) + kvh) * QPK + offs_h) * n_parts + part)[:, None] * HEAD_DIM
            tl.store(a_ptrs + offs_d[None, :], acc, mask=mask_h[:, None] & mask_d[None, :])
        else:
            o = tl.where(l[:, None] > 0, acc / tl.maximum(l, 1e-30)[:, None], 0.0)
            tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=mask_h[:, None] & mask_d[None, :])

    @triton.jit
    def _combine_kernel(
        ws_ml_ptr, ws_acc_ptr, out_ptr, NUM_HEADS, NUM_PARTS, HEAD_DIM, stride_ob, stride_oh,
        BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_p = tl.arange(0, BLOCK_P)
        offs_d = tl.arange(0, BLOCK_D)
        mask_p = offs_p < NUM_PARTS
        base = (b * NUM_HEADS + h) * NUM_PARTS
        m = tl.load(ws_ml_ptr + (base + offs_p) * 2, mask=mask_p, other=-1e30)
        l = tl.load(ws_ml_ptr + (base + offs_p) * 2 + 1, mask=mask_p, other=0.0)
        acc = tl.load(ws_acc_ptr + (base + offs_p)[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=mask_p[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        w = tl.exp(m - tl.max(m, axis=0))
        total = tl.sum(w * l, axis=0)
        o = tl.sum(w[:, None] * acc, axis=0)
        o = tl.where(total > 0, o / tl.maximum(total, 1e-30), 0.0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty),
                 mask=offs_d < HEAD_DIM)


def default_num_splits(num_seqs: int, kv_heads: int, max_seq_len: int, num_sms: int = 132) -> int:
    """Context partitions: enough programs for ~2 waves of ``num_sms`` SMs, >= 256 keys each, at most 32."""
    want = -(-2 * num_sms // max(num_seqs * kv_heads, 1))
    return max(1, min(32, want, -(-max_seq_len // 256)))


def _check(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> None:
    if q.dim() != 3 or kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"q must be [B, H, D] and kv_cache [2, blocks, block_size, KVH, D]; got "
                         f"{tuple(q.shape)} and {tuple(kv_cache.shape)}")
    b, h, d = q.shape
    if kv_cache.shape[4] != d or h % kv_cache.shape[3]:
        raise ValueError(f"head_dim {d} / heads {h} do not fit kv_cache {tuple(kv_cache.shape)} (H % KVH must be 0)")
    if block_tables.dim() != 2 or block_tables.shape[0] != b or seq_lens.shape != (b,):
        raise ValueError(f"block_tables [B={b}, max_blocks] and seq_lens [B] expected; got "
                         f"{tuple(block_tables.shape)} and {tuple(seq_lens.shape)}")
    if q.stride(2) != 1 or kv_cache.stride(4) != 1:
        raise ValueError("q and kv_cache must be contiguous in head_dim")
    if not triton_usable(q):
        raise ValueError("Triton decode attention needs CUDA (or TRITON_INTERPRET=1); use paged_attention")


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of q [B, H, D] over the paged cache; returns [B, H, D] in q.dtype (``out`` if given)."""
    _check(q, kv_cache, block_tables, seq_lens)
    b, h, d = q.shape
    kvh = kv_cache.shape[3]
    qpk = h // kvh
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} contiguous in head_dim")
    if b == 0:
        return out
    parts = num_splits or default_num_splits(b, kvh, max_seq_len)
    block_t = 64 if d <= 128 else 32
    part_len = -(-max(max_seq_len, 1) // parts)
    part_len = -(-part_len // block_t) * block_t
    split = parts > 1
    ws_ml = torch.empty(b * h * parts * 2 if split else 1, device=q.device, dtype=torch.float32)
    ws_acc = torch.empty(b * h * parts * d if split else 1, device=q.device, dtype=torch.float32)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _decode_kernel[(b, kvh, parts)](
        q, k_cache, v_cache, block_tables, seq_lens, out, ws_ml, ws_acc,
        float(scale), int(sliding_window or _NO_WINDOW), part_len, qpk, d, kv_cache.shape[2],
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        BLOCK_H=max(16, triton.next_power_of_2(qpk)), BLOCK_T=block_t, BLOCK_D=max(16, triton.next_power_of_2(d)),
        SPLIT=split, DOT_F32=q.dtype == torch.bfloat16 and not q.is_cuda, num_warps=4,
    )
    if split:
        _combine_kernel[(b, h)](
            ws_ml, ws_acc, out, h, parts, d, out.stride(0), out.stride(1),
            BLOCK_P=max(2, triton.next_power_of_2(parts)), BLOCK_D=triton.next_power_of_2(d),
        )
    return out
