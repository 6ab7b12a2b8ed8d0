"""Multi-LoRA over token segments (SGMV, for prefill-sized batches): Triton shrink/expand + launcher.

Owns the GPU path of ``out[t] += scaling[s] * (x[t] @ A[s]ᵀ) @ B[s]ᵀ`` for batches whose tokens were grouped
by adapter slot on the host (``lora_sgmv.build_segments`` / ``LoRAPool.prepare``). The torch reference it must
match is ``inlaid.kernels.lora_sgmv.lora_apply`` (same segments, same math); this module imports nothing from
``inlaid`` outside ``inlaid.kernels``.

Why a second LoRA kernel: the BGMV kernels of ``lora_sgmv_triton`` (decode, one program per token) re-read
the adapter's A/B for every token, and the torch SGMV reference launches ~5 kernels per (slot, projection):
with 5-24 adapters in a prefill step of a 32-layer model that is thousands of small launches per step.
Here one shrink and one expand launch per projection cover every segment:

- the host cuts each segment into tiles of at most ``BLOCK_T`` tokens (``segment_tiles``: one int32
  ``[3, n_tiles]`` tensor of (first sorted position, length, slot), built once per batch);
- shrink: one program per tile computes ``x[tokens] @ A[slot]ᵀ`` with ``tl.dot`` over the input dim
  (A read once per tile, not per token) into fp32 ``[T_sorted, R]``;
- expand: one program per (tile, output block) computes ``p @ B[slot]ᵀ``, scales in fp32 and adds into
  ``out[tokens]`` (each token belongs to one tile: no two programs write the same element).

Ranks below R are zero-padded in the stacks (the padding adds exactly 0); R is padded to >= 16 for
``tl.dot``. Tokens without an adapter (slot -1) are not in any segment and are left untouched.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, dot_f32, kernels_interpreted, tl, triton, triton_usable  # noqa: F401 (re-exported)

BLOCK_T = 32
"""Tokens per tile (the M of the tile GEMMs)."""

if HAS_TRITON:

    @triton.jit
    def _tile(order_ptr, tiles_ptr, n_tiles, BLOCK_T: tl.constexpr):
        """This program's tile: first sorted position, slot (int64), row mask and token indices [BLOCK_T]."""
        tile = tl.program_id(0)
        start = tl.load(tiles_ptr + tile)
        length = tl.load(tiles_ptr + n_tiles + tile)
        slot = tl.load(tiles_ptr + 2 * n_tiles + tile).to(tl.int64)
        offs_t = tl.arange(0, BLOCK_T)
        mask_t = offs_t < length
        tok = tl.load(order_ptr + start + offs_t, mask=mask_t, other=0).to(tl.int64)
        return start, slot, offs_t, mask_t, tok

    @triton.jit
    def _seg_shrink_kernel(
        x_ptr, a_ptr, order_ptr, tiles_ptr, p_ptr, n_tiles, D_IN, R,
        stride_xt, stride_as, stride_ar, stride_pt,
        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        start, slot, offs_t, mask_t, tok = _tile(order_ptr, tiles_ptr, n_tiles, BLOCK_T)
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, D_IN, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < D_IN
            x = tl.load(x_ptr + tok[:, None] * stride_xt + offs_k[None, :], mask=mask_t[:, None] & mask_k[None, :],
                        other=0.0)
            a = tl.load(a_ptr + slot * stride_as + offs_r[None, :] * stride_ar + offs_k[:, None],
                        mask=mask_r[None, :] & mask_k[:, None], other=0.0)  # [BLOCK_K, BLOCK_R] = A[slot]ᵀ tile
            if DOT_F32:
                acc += tl.dot(x.to(tl.float32), a.to(tl.float32), input_precision="ieee")  # fp32 means fp32
            else:
                acc += tl.dot(x, a)
        pos = start + offs_t
        tl.store(p_ptr + pos[:, None] * stride_pt + offs_r[None, :], acc, mask=mask_t[:, None] & mask_r[None, :])

    @triton.jit
    def _seg_expand_kernel(
        p_ptr, b_ptr, scal_ptr, order_ptr, tiles_ptr, out_ptr, n_tiles, D_OUT, R,
        stride_pt, stride_bs, stride_bn, stride_ot,
        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    ):
        nb = tl.program_id(1)
        start, slot, offs_t, mask_t, tok = _tile(order_ptr, tiles_ptr, n_tiles, BLOCK_T)
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < D_OUT
        p = tl.load(p_ptr + (start + offs_t)[:, None] * stride_pt + offs_r[None, :],
                    mask=mask_t[:, None] & mask_r[None, :], other=0.0)  # fp32 [BLOCK_T, BLOCK_R]
        b = tl.load(b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn + offs_r[:, None],
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(tl.float32)  # B[slot]ᵀ [BLOCK_R, BLOCK_N]
        if IEEE:  # fp32 output: no TF32 rounding (torch's fp32 matmul default); TF32 keeps as many mantissa bits
            # as an fp16 output and more than a bf16 one
            delta = tl.dot(p, b, input_precision="ieee") * tl.load(scal_ptr + slot).to(tl.float32)
        else:
            delta = tl.dot(p, b) * tl.load(scal_ptr + slot).to(tl.float32)
        o_ptrs = out_ptr + tok[:, None] * stride_ot + offs_n[None, :]
        o_mask = mask_t[:, None] & mask_n[None, :]
        o = tl.load(o_ptrs, mask=o_mask, other=0.0)
        tl.store(o_ptrs, (o.to(tl.float32) + delta).to(out_ptr.dtype.element_ty), mask=o_mask)


def segment_tiles(starts: tuple[int, ...], slots: tuple[int, ...], device: torch.device,
                  block_t: int = BLOCK_T) -> torch.Tensor:
    """int32 ``[3, n_tiles]``: (first sorted position, length <= block_t, slot) of every tile of every segment."""
    first, length, slot = [], [], []
    for i, s in enumerate(slots):
        for lo in range(starts[i], starts[i + 1], block_t):
            first.append(lo)
            length.append(min(block_t, starts[i + 1] - lo))
            slot.append(s)
    return torch.tensor([first, length, slot], dtype=torch.int32).to(device, non_blocking=True)


def lora_apply_segments(
    x: torch.Tensor,
    out: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    scalings: torch.Tensor,
    token_order: torch.Tensor,
    tiles: torch.Tensor,
) -> torch.Tensor:
    """Add every segmented token's scaled LoRA delta to ``out`` in place (two launches); returns ``out``.

    ``token_order`` [T_sorted] (token indices grouped by slot) and ``tiles`` (``segment_tiles``) describe the
    segments; x, out, A, B share one dtype; A [S, R, in] and B [S, out, R] (any strides but the last).
    """
    if not triton_usable(x):
        raise ValueError("lora_apply_segments needs Triton on CUDA (or TRITON_INTERPRET=1); use lora_sgmv.lora_apply")
    if x.dim() != 2 or out.dim() != 2 or x.shape[0] != out.shape[0] or a_stack.dim() != 3 or b_stack.dim() != 3:
        raise ValueError(f"x [T, in], out [T, out], A [S, R, in], B [S, out, R]; got {tuple(x.shape)}, "
                         f"{tuple(out.shape)}, {tuple(a_stack.shape)}, {tuple(b_stack.shape)}")  # fmt: skip
    s, r, d_in = a_stack.shape
    if x.shape[1] != d_in or b_stack.shape != (s, out.shape[1], r) or scalings.shape != (s,):
        raise ValueError(f"LoRA stacks do not fit x {tuple(x.shape)} / out {tuple(out.shape)}: A {tuple(a_stack.shape)}, "
                         f"B {tuple(b_stack.shape)}, scalings {tuple(scalings.shape)}")  # fmt: skip
    if len({x.dtype, out.dtype, a_stack.dtype, b_stack.dtype}) != 1:
        raise ValueError(f"x, out, A, B must share one dtype; got {x.dtype}, {out.dtype}, {a_stack.dtype}, {b_stack.dtype}")
    if tiles.dim() != 2 or tiles.shape[0] != 3 or tiles.dtype != torch.int32:
        raise ValueError(f"tiles must be int32 [3, n_tiles] (segment_tiles), got {tiles.dtype} {tuple(tiles.shape)}")
    n_tiles = tiles.shape[1]
    if n_tiles == 0:
        return out
    x, out_c = x.contiguous(), out if out.stride(1) == 1 else out.contiguous()
    if a_stack.stride(2) != 1:  # the pool's stacks (views into fused q/k/v, gate/up buffers) have unit-stride rows
        a_stack = a_stack.contiguous()
    if b_stack.stride(2) != 1:
        b_stack = b_stack.contiguous()
    block_r = max(16, triton.next_power_of_2(r))
    p = torch.empty(token_order.shape[0], r, device=x.device, dtype=torch.float32)
    _seg_shrink_kernel[(n_tiles,)](
        x, a_stack, token_order, tiles, p, n_tiles, d_in, r, x.stride(0), a_stack.stride(0), a_stack.stride(1),
        p.stride(0), BLOCK_T=BLOCK_T, BLOCK_R=block_r, BLOCK_K=64, DOT_F32=dot_f32(x),
    )
    block_n = 64
    _seg_expand_kernel[(n_tiles, triton.cdiv(out.shape[1], block_n))](
        p, b_stack, scalings, token_order, tiles, out_c, n_tiles, out.shape[1], r, p.stride(0), b_stack.stride(0),
        b_stack.stride(1), out_c.stride(0), BLOCK_T=BLOCK_T, BLOCK_R=block_r, BLOCK_N=block_n,
        IEEE=out.dtype == torch.float32,
    )
    if out_c is not out:
        out.copy_(out_c)
    return out
