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
``max_seq_len`` bound. Each program splits its own sequence's keys evenly over
the partitions (from ``seq_lens`` on the device), so a graph captured for a
long bound still spreads a short context over all of them.

``rope=DecodeRope(k, v, cos, sin, slot_mapping)`` folds the step's RoPE and
K/V-cache write (``rotary_kv.rotary_and_write_kv``, same bits in the cache)
into this launch: q arrives unrotated and each program rotates its heads; the
program whose partition holds the newest key adds that key and value to its
online softmax from registers after its loop and then writes them to the
cache, while every program reads the cache only below the newest key, so no
program reads a slot another one writes. The model uses it where the launch
has few programs (``rope_pays``).

Prefill (q_len > 1) is NOT implemented here: it stays on the reference
(``paged_attention``, SDPA over gathered K/V), which is compute-bound and
already uses fused SDPA; a varlen Triton prefill kernel is future work. Why a
hand-written kernel rather than a library: flash-attn / FlashInfer wheels are
tied to exact CUDA/torch builds and do not install from PyPI into CPU or
arbitrary user environments; this kernel needs only ``triton``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._triton import HAS_TRITON, kernels_interpreted, pdl_options, tl, triton, triton_usable  # noqa: F401 (re-exported)

_NO_WINDOW = 1 << 30


class DecodeRope(NamedTuple):
    """The rotary + KV-cache write that ``paged_decode_attention`` does itself (``rope=``), for one new token per
    sequence: ``k``/``v`` [B, KVH, D] are the new token's (k unrotated), ``cos``/``sin`` [B, 1, D] or [B, D] its
    rotary rows, ``slot_mapping`` [B] its cache slot. Same bits as ``rotary_kv.rotary_and_write_kv``."""

    k: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    slot_mapping: torch.Tensor


if HAS_TRITON:
    from ._triton import pdl_enter
    from .rotary_kv import rope_apply, rope_load, rope_rows

    @triton.jit
    def _decode_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, sl_ptr, out_ptr, ws_ml_ptr, ws_acc_ptr,
        nk_ptr, nv_ptr, cos_ptr, sin_ptr, slots_ptr,
        scale, window, QPK, HEAD_DIM, BLOCK_SIZE,
        stride_qb, stride_qh, stride_cb, stride_co, stride_ch, stride_btb, stride_ob, stride_oh,
        stride_nkb, stride_nkh, stride_nvb, stride_nvh, stride_cs,
        BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
        SPLIT: tl.constexpr, ROPE: tl.constexpr, DOT_F32: tl.constexpr, ON_CUDA: tl.constexpr,
        PDL: tl.constexpr = 0,
    ):
        pdl_enter(PDL)
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        part = tl.program_id(2)
        n_parts = tl.num_programs(2)
        seq_len = tl.load(sl_ptr + b)
        offs_h = tl.arange(0, BLOCK_H)
        heads = kvh * QPK + offs_h
        mask_h = offs_h < QPK
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh
        cos_row, sin_row = cos_ptr + b * stride_cs, sin_ptr + b * stride_cs
        if ROPE:  # q arrives unrotated: every program rotates its heads' rows (bits of rotary_kv's kernel)
            q = rope_rows(q_rows, offs_d[None, :], mask_h[:, None] & mask_d[None, :], cos_row, sin_row,
                          HEAD_DIM // 2, ON_CUDA)
        else:
            q = tl.load(q_rows + offs_d[None, :], mask=mask_h[:, None] & mask_d[None, :], other=0.0)
        # this sequence's keys [first, seq_len) split evenly over the partitions (in BLOCK_T multiples), so a
        # graph captured for a long max_seq_len still spreads a short context over every partition
        first = tl.maximum(seq_len - window, 0)
        part_len = tl.cdiv(tl.cdiv(seq_len - first, n_parts), BLOCK_T) * BLOCK_T
        start = first + part * part_len
        end = tl.minimum(start + part_len, seq_len)
        m = tl.full((BLOCK_H,), -1e30, dtype=tl.float32)
        l = tl.zeros((BLOCK_H,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
        cache_end = end
        if ROPE:
            # the newest key's slot is written by this launch, so the cache is read only below it; the partition
            # holding it adds it to its online softmax after the loop and then writes it to the cache (no program
            # reads a slot another one writes). Its rows are loaded here and used only after the loop, so their
            # latency hides behind the loop's; a store before the loop would hold the loop's loads back (the
            # compiler cannot tell the slot from the keys it reads).
            cache_end = tl.minimum(end, seq_len - 1)
            holder = (start < end) & (end == seq_len)
            nk = rope_load(nk_ptr + b * stride_nkb + kvh * stride_nkh, offs_d, mask_d, cos_row, sin_row,
                           HEAD_DIM // 2)
            v_new = tl.load(nv_ptr + b * stride_nvb + kvh * stride_nvh + offs_d, mask=mask_d, other=0.0)
            slot = tl.load(slots_ptr + b).to(tl.int64)
        for j0 in range(start, cache_end, BLOCK_T):
            offs_t = j0 + tl.arange(0, BLOCK_T)
            mask_t = offs_t < cache_end
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
        if ROPE:
            k_new = rope_apply(nk[0], nk[1], nk[2], nk[3], offs_d, HEAD_DIM // 2, ON_CUDA)
            s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale
            m_new = tl.where(holder, tl.maximum(m, s_new), m)
            alpha = tl.exp(m - m_new)
            p_new = tl.where(holder, tl.exp(s_new - m_new), 0.0)
            l = l * alpha + p_new
            acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
            m = m_new
            dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_co + kvh * stride_ch + offs_d
            mask_w = offs_d < tl.where(holder, HEAD_DIM, 0)  # the holder's lanes only
            tl.store(k_ptr + dst, k_new.to(k_ptr.dtype.element_ty), mask=mask_w)
            tl.store(v_ptr + dst, v_new.to(v_ptr.dtype.element_ty), mask=mask_w)
        if SPLIT:
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
        BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = 0,
    ):
        pdl_enter(PDL)
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


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of ``_decode_kernel``: keys per loop step, warps, software-pipeline stages."""

    block_t: int = 64
    num_warps: int = 4
    num_stages: int = 2


def default_config(head_dim: int, max_seq_len: int | None = None) -> DecodeConfig:
    """The installed launch parameters (32 keys per step above head_dim 128, where a 64-key tile is too big).
    Two stages, not Triton's three: in session 13's H100 sweep (``decode_attention_bench.py --sweep``) they took
    5-6% off a 64-key context at batch 1 and 32 and stayed within 1.2% of three at 512-2048 keys.

    Head_dim 128 with ``max_seq_len <= MIN_PARTITION_KEYS`` (the short-context graphs: at most two tiles a
    program, nothing for a software pipeline to overlap): 8 warps and one stage. Session 20's sweep at that bound
    (page ``decode_attention_sweep128_s20_h100``, one partition): batch 1 at 64 / 128 keys 4.63 / 6.76 us against
    5.40 / 7.51 for the default, batch 2 / 4 / 8 at 96 keys 6.86 / 9.44 / 11.17 against 7.42 / 10.02 / 11.94.
    Only head_dim 128 was measured."""
    if head_dim == 128 and max_seq_len is not None and max_seq_len <= MIN_PARTITION_KEYS:
        return DecodeConfig(block_t=64, num_warps=8, num_stages=1)
    return DecodeConfig(block_t=64 if head_dim <= 128 else 32)


MIN_PARTITION_KEYS = 128
"""The fewest keys a context partition gets from ``default_num_splits`` (a context this short is not split).
H100, fp16, one layer of 7B attention with RoPE, graph-timed (``decode_attention_bench.py``, pages
``decode_attention_bound{256,4096}_s20_h100``): at batch 1 one partition took 5.4 / 7.4 us at 64 / 128 keys
against 7.9 / 8.5 split nine ways (with the combine launch), but 11.7 against 8.9 at 256 keys; batch 2 and 4 lose
at 256 keys too (14.6 / 15.9 against 11.3 / 14.7 us). Was 256 before session 20."""


def default_num_splits(num_seqs: int, kv_heads: int, max_seq_len: int, num_sms: int = 132) -> int:
    """Context partitions: enough programs for ~2 waves of ``num_sms`` SMs, >= ``MIN_PARTITION_KEYS`` keys each,
    at most 32."""
    want = -(-2 * num_sms // max(num_seqs * kv_heads, 1))
    return max(1, min(32, want, -(-max_seq_len // MIN_PARTITION_KEYS)))


def unsplit_max_seq_len(num_seqs: int, kv_heads: int) -> int | None:
    """The largest ``max_seq_len`` that ``default_num_splits`` runs in one partition (no combine launch) at this
    batch; None when every length is (the (sequence, KV head) programs alone fill the GPU). CUDA graphs capture a
    second decode graph at this bound for short contexts (``worker.cuda_graphs``)."""
    return None if default_num_splits(num_seqs, kv_heads, 1 << 30) == 1 else MIN_PARTITION_KEYS


def rope_pays(num_seqs: int, kv_heads: int) -> bool:
    """Whether ``rope=`` should be used for this launch: where the launch has few programs, i.e. where a long
    context would be split (``unsplit_max_seq_len`` is not None), whether or not this one is. There the fused
    launch took 2-8% off the rotary + attention launches (H100, fp16, one layer) and 7B W4 decode at batch 1
    gained ~2% end to end. With enough (sequence, KV head) programs to fill the GPU the kernel was within 3% of
    the two launches either way, but 7B W4 decode at batch 32 read 0.5-3% slower end to end in three calls
    (session 13), so the rotary launch stays there."""
    return unsplit_max_seq_len(num_seqs, kv_heads) is not None


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


def _check_rope(rope: DecodeRope, q: torch.Tensor, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validates ``rope`` against q [B, H, D]; returns cos and sin as [B, D] with unit last stride."""
    b, _, d = q.shape
    kvh = kv_cache.shape[3]
    if d % 2 or rope.k.shape != (b, kvh, d) or rope.v.shape != (b, kvh, d):
        raise ValueError(f"rope: k and v must be [B={b}, KVH={kvh}, D={d}] (even D); got {tuple(rope.k.shape)} "
                         f"and {tuple(rope.v.shape)}")
    if rope.cos.numel() != b * d or rope.sin.numel() != b * d or rope.slot_mapping.shape != (b,):
        raise ValueError(f"rope: cos/sin must hold [B={b}, D={d}] and slot_mapping be [{b}]; got "
                         f"{tuple(rope.cos.shape)}, {tuple(rope.sin.shape)}, {tuple(rope.slot_mapping.shape)}")
    if len({q.dtype, kv_cache.dtype, rope.k.dtype, rope.v.dtype, rope.cos.dtype, rope.sin.dtype}) != 1:
        raise ValueError("rope: q, kv_cache, k, v, cos and sin must share one dtype")
    if rope.k.stride(2) != 1 or rope.v.stride(2) != 1:
        raise ValueError("rope: k and v must be contiguous in head_dim")
    cos, sin = rope.cos.reshape(b, d), rope.sin.reshape(b, d)
    return (cos if cos.stride(1) == 1 else cos.contiguous()), (sin if sin.stride(1) == 1 else sin.contiguous())


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
    rope: DecodeRope | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Decode attention of q [B, H, D] over the paged cache; returns [B, H, D] in q.dtype (``out`` if given).

    With ``rope`` q arrives unrotated and the launch also does ``rotary_kv.rotary_and_write_kv``'s work for the
    new token (rotates q and k, writes k and v at ``rope.slot_mapping``): one launch instead of two. ``config``
    overrides ``default_config`` (benchmark sweeps)."""
    _check(q, kv_cache, block_tables, seq_lens)
    if rope is not None:
        cos, sin = _check_rope(rope, q, kv_cache)
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
    cfg = config or default_config(d, max_seq_len)
    split = parts > 1
    ws_ml = torch.empty(b * h * parts * 2 if split else 1, device=q.device, dtype=torch.float32)
    ws_acc = torch.empty(b * h * parts * d if split else 1, device=q.device, dtype=torch.float32)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    if rope is None:  # the rope arguments are never read: any tensors of the right kind stand in
        new_k = new_v = q
        cos = sin = slots = seq_lens
    else:
        new_k, new_v, slots = rope.k, rope.v, rope.slot_mapping
    _decode_kernel[(b, kvh, parts)](
        q, k_cache, v_cache, block_tables, seq_lens, out, ws_ml, ws_acc, new_k, new_v, cos, sin, slots,
        float(scale), int(sliding_window or _NO_WINDOW), qpk, d, kv_cache.shape[2],
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        new_k.stride(0), new_k.stride(1), new_v.stride(0), new_v.stride(1), cos.stride(0),
        BLOCK_H=max(16, triton.next_power_of_2(qpk)), BLOCK_T=cfg.block_t, BLOCK_D=max(16, triton.next_power_of_2(d)),
        SPLIT=split, ROPE=rope is not None, DOT_F32=q.dtype == torch.bfloat16 and not q.is_cuda,
        ON_CUDA=q.is_cuda, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        # fp32 (tests only): no FMA contraction, so the rotary products and sums round as torch's ops do
        enable_fp_fusion=q.dtype != torch.float32, **pdl_options(q),
    )
    if split:
        _combine_kernel[(b, h)](
            ws_ml, ws_acc, out, h, parts, d, out.stride(0), out.stride(1),
            BLOCK_P=max(2, triton.next_power_of_2(parts)), BLOCK_D=triton.next_power_of_2(d), **pdl_options(q),
        )
    return out
