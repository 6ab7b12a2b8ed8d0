"""Fused rotary embedding of q and k plus the paged KV-cache write: Triton kernel, launcher, torch reference.

Owns ``rotary_and_write_kv(q, k, v, cos, sin, kv_cache, slot_mapping) -> (q_rot, k_rot)``:

- ``q_rot = apply_rotary(q)``, ``k_rot = apply_rotary(k)`` with HF's ``rotate_half`` convention and its
  rounding: ``x*cos`` and ``rotate_half(x)*sin`` each rounded to the dtype, then their sum rounded;
- ``k_rot`` and ``v`` stored at the flat slots ``slot_mapping`` of ``kv_cache`` exactly like
  ``inlaid.kernels.paged_attention.write_kv`` (cache layout [2, num_blocks, block_size, KVH, D]).

``q_rot``/``k_rot`` are new contiguous tensors in both paths (q, k, v are never written). Shapes: q [T, H, D],
k and v [T, KVH, D], cos/sin [T, 1, D] (or [T, D]) in q's dtype, slot_mapping [T] int. Several rows may name
the same slot (CUDA-graph padding rows all write the scratch slot, which is never read): which one lands there
is unspecified, as with ``index_copy_``.

Dispatch (``fused_ok``): the Triton kernel for CUDA fp16/bf16 tensors with a cache of the same dtype; the torch
reference otherwise (CPU, fp32). Every operation is elementwise and correctly rounded, so the kernel's q_rot,
k_rot and cache contents are bit-identical to the reference's (the tests check it with ``torch.equal``).
One program per (token, head) of q and k; the program of k head h also copies v head h into the cache. No
host sync, no data-dependent shape (CUDA-graph capturable). Imports nothing from inlaid outside
``inlaid.kernels``.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, kernels_interpreted, pdl_options, tl, triton, triton_usable  # noqa: F401 (re-exported)
from .paged_attention import write_kv

FUSED_DTYPES = (torch.float16, torch.bfloat16)

if HAS_TRITON:
    from ._triton import pdl_enter
    from .rms_norm import round_to

    @triton.jit
    def _round_opaque(v, DTYPE: tl.constexpr, ON_CUDA: tl.constexpr):
        """fp32 ``v`` rounded to nearest-even in ``DTYPE``; on CUDA through inline PTX, which LLVM cannot see
        into: a plain ``fptrunc(a * b)`` becomes a 16-bit multiply, which FMA contraction then fuses with the
        following add, skipping the product's rounding (H200: ~25% of outputs 1 ulp off torch's)."""
        if DTYPE == tl.float32:
            return v
        elif ON_CUDA:
            if DTYPE == tl.bfloat16:
                return tl.inline_asm_elementwise("cvt.rn.bf16.f32 $0, $1;", "=h,f", [v], dtype=tl.bfloat16,
                                                 is_pure=True, pack=1)
            else:
                return tl.inline_asm_elementwise("cvt.rn.f16.f32 $0, $1;", "=h,f", [v], dtype=tl.float16,
                                                 is_pure=True, pack=1)
        else:
            return round_to(v, DTYPE, ON_CUDA)

    @triton.jit
    def rope_load(row_ptrs, offs_d, mask, cos_row, sin_row, HALF):
        """The loads of ``rope_rows``: ``(x, rotate_half's partner of x, cos, sin)`` (a caller that issues them
        early and rotates late keeps the load latency off its critical path)."""
        partner = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)
        x = tl.load(row_ptrs + offs_d, mask=mask, other=0.0)
        xp = tl.load(row_ptrs + partner, mask=mask, other=0.0)
        c = tl.load(cos_row + offs_d, mask=offs_d < 2 * HALF, other=0.0)
        n = tl.load(sin_row + offs_d, mask=offs_d < 2 * HALF, other=0.0)
        return x, xp, c, n

    @triton.jit
    def rope_apply(x, xp, c, n, offs_d, HALF, ON_CUDA: tl.constexpr):
        """``x*cos + rotate_half(x)*sin`` from ``rope_load``'s values (see ``rope_rows``), in x's dtype."""
        dt = x.dtype
        xc = _round_opaque(x.to(tl.float32) * c.to(tl.float32), dt, ON_CUDA).to(tl.float32)
        xp = xp.to(tl.float32)
        ps = _round_opaque(tl.where(offs_d < HALF, -xp, xp) * n.to(tl.float32), dt, ON_CUDA).to(tl.float32)
        return _round_opaque(xc + ps, dt, ON_CUDA)

    @triton.jit
    def rope_rows(row_ptrs, offs_d, mask, cos_row, sin_row, HALF, ON_CUDA: tl.constexpr):
        """Rows ``row_ptrs + offs_d`` rotated at full width, in x's dtype: ``out[d] = x[d]*cos[d] + p[d]*sin[d]``
        with ``p = rotate_half(x)`` (``-x[d + HALF]`` below HALF, ``x[d - HALF]`` above), each product rounded to
        the dtype and then their sum rounded, as HF's torch ops do. ``offs_d`` spans one head (``2 * HALF``
        lanes masked by ``mask``); cos/sin rows broadcast over the rows. Shared by the rotary kernel below and
        the decode attention kernel that rotates q and the new token's k itself."""
        x, xp, c, n = rope_load(row_ptrs, offs_d, mask, cos_row, sin_row, HALF)
        return rope_apply(x, xp, c, n, offs_d, HALF, ON_CUDA)

    @triton.jit
    def _rotary_kv_kernel(
        q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, cache_ptr, slots_ptr,
        H, KVH, block_size,
        s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ct, s_st,
        s_cache_kv, s_cache_blk, s_cache_off, s_cache_h,
        HALF: tl.constexpr, BLOCK_D: tl.constexpr, ON_CUDA: tl.constexpr, PDL: tl.constexpr = 0,
    ):
        pdl_enter(PDL)
        t = tl.program_id(0).to(tl.int64)
        hh = tl.program_id(1).to(tl.int64)
        offs = tl.arange(0, BLOCK_D)
        mask = offs < 2 * HALF
        cos_row, sin_row = cos_ptr + t * s_ct, sin_ptr + t * s_st
        if hh < H:  # a q head
            o = rope_rows(q_ptr + t * s_qt + hh * s_qh, offs, mask, cos_row, sin_row, HALF, ON_CUDA)
            tl.store(qo_ptr + (t * H + hh) * (2 * HALF) + offs, o, mask=mask)
        else:  # a k head: rotate, store, and copy k_rot and v into the cache slot
            head = hh - H
            o = rope_rows(k_ptr + t * s_kt + head * s_kh, offs, mask, cos_row, sin_row, HALF, ON_CUDA)
            tl.store(ko_ptr + (t * KVH + head) * (2 * HALF) + offs, o, mask=mask)
            slot = tl.load(slots_ptr + t).to(tl.int64)
            cdst = cache_ptr + (slot // block_size) * s_cache_blk + (slot % block_size) * s_cache_off \
                + head * s_cache_h
            ety = cache_ptr.dtype.element_ty
            tl.store(cdst + offs, o.to(ety), mask=mask)
            v = tl.load(v_ptr + t * s_vt + head * s_vh + offs, mask=mask, other=0.0)
            tl.store(cdst + s_cache_kv + offs, v.to(ety), mask=mask)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF's rotate_half: [-x2, x1] over the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, D] with cos/sin [T, 1, D] (HF's rotate_half convention)."""
    return x * cos + rotate_half(x) * sin


def rotary_and_write_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor, kv_cache: torch.Tensor,
                            slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference: ``apply_rotary`` on q and k, then ``write_kv(k_rot, v)``."""
    q_rot, k_rot = apply_rotary_ref(q, cos, sin), apply_rotary_ref(k, cos, sin)
    write_kv(k_rot, v, kv_cache, slot_mapping)
    return q_rot, k_rot


def fused_ok(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """True when ``rotary_and_write_kv`` runs the Triton kernel: CUDA, Triton, fp16/bf16 q and cache."""
    return HAS_TRITON and q.is_cuda and q.dtype in FUSED_DTYPES and kv_cache.dtype == q.dtype


def rotary_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_rot, k_rot)`` with k_rot/v written to the cache: the Triton kernel where ``fused_ok``, else torch."""
    if fused_ok(q, kv_cache):
        return rotary_and_write_kv_triton(q, k, v, cos, sin, kv_cache, slot_mapping)
    return rotary_and_write_kv_ref(q, k, v, cos, sin, kv_cache, slot_mapping)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, kv_cache: torch.Tensor,
           slot_mapping: torch.Tensor) -> None:
    t, _, d = q.shape
    if k.shape != v.shape or k.shape[0] != t or k.shape[2] != d or d % 2:
        raise ValueError(f"rotary_and_write_kv: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be "
                         "[T, H, D], [T, KVH, D], [T, KVH, D] with an even D")
    if cos.reshape(-1, d).shape[0] != t or kv_cache.shape[0] != 2 or tuple(kv_cache.shape[3:]) != tuple(k.shape[1:]):
        raise ValueError(f"rotary_and_write_kv: cos {tuple(cos.shape)} must be [T, 1, D] and kv_cache "
                         f"{tuple(kv_cache.shape)} [2, blocks, block_size, KVH, D] for k {tuple(k.shape)}")
    if slot_mapping.shape != (t,):
        raise ValueError(f"rotary_and_write_kv: slot_mapping must have shape ({t},), got {tuple(slot_mapping.shape)}")
    if not triton_usable(q):
        raise ValueError("rotary_and_write_kv_triton: needs Triton on q's device (CUDA, or TRITON_INTERPRET=1)")


def _last_contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def rotary_and_write_kv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                               sin: torch.Tensor, kv_cache: torch.Tensor,
                               slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``); ValueError on inconsistent shapes."""
    _check(q, k, v, cos, kv_cache, slot_mapping)
    t, h, d = q.shape
    kvh = k.shape[1]
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    cos2, sin2 = _last_contig(cos.reshape(t, d)), _last_contig(sin.reshape(t, d))
    if kv_cache.stride(-1) != 1:
        raise ValueError("rotary_and_write_kv_triton: kv_cache must be contiguous in its last dim")
    q_out = torch.empty((t, h, d), device=q.device, dtype=q.dtype)
    k_out = torch.empty((t, kvh, d), device=k.device, dtype=k.dtype)
    if t > 0:
        half = d // 2
        _rotary_kv_kernel[(t, h + kvh)](
            q, k, v, cos2, sin2, q_out, k_out, kv_cache, slot_mapping, h, kvh, kv_cache.shape[2],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            cos2.stride(0), sin2.stride(0),
            kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
            HALF=half, BLOCK_D=triton.next_power_of_2(d), ON_CUDA=q.is_cuda, num_warps=1,
            # fp32: no FMA contraction, so products and sums round as torch's ops do (fp16/bf16 products go
            # through _round_opaque, which nothing can fuse across)
            enable_fp_fusion=q.dtype != torch.float32, **pdl_options(q),
        )
    return q_out, k_out
