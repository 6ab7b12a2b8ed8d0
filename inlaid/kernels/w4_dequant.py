"""Dequantize monotone-g_idx 4-bit GPTQ tensors to a dense [K, N] weight (Triton kernel + torch path).

Owns the large-M path of ``w4a16_gemm.w4a16_linear``: dequantize once, then
``torch.matmul`` (cuBLAS). Torch reference: ``gptq_dequant.dequantize_gptq``
with ``g_idx = arange(K) // group_size`` (bit-exact: the product is formed in
fp32 and cast once). The last group may be partial (K % group_size != 0).

Kernel layout: a program owns whole packed words (8 rows of W each) x a column block, so each word, zero and
scale is loaded once and nibble j of word row r is stored as the contiguous row 8r + j. That needs the 8 rows
of a word to share a group (group sizes that are multiples of 8, as GPTQ writes them); any other group size
takes the torch path.

Tensor-core layout (``layout="tc"``, ``w4_layout``): a program owns one 128-row step x a column block and stores
nibble j of word c as input row ``128 s + j2 + 2t + 8j0 + 16j1 + 32v`` (c = 4t + v), a contiguous BLOCK_N run per
(c, j); the torch path converts back with ``from_tc_layout`` first.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, kernels_interpreted, tl, triton, triton_usable
from .w4_layout import TC_STEP, from_tc_layout, unpack4_rows

__all__ = ["dequantize_w4", "kernels_interpreted", "triton_usable"]

if HAS_TRITON:

    @triton.jit
    def _dequant4_kernel(
        qw_ptr, qz_ptr, sc_ptr, w_ptr, N, KW,
        stride_qk, stride_zg, stride_sg, stride_wk,
        GROUP_SIZE: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # A program owns BLOCK_W packed word rows (8 * BLOCK_W rows of W) x BLOCK_N columns: every word, zero and
        # scale is loaded once (the 8 K rows of a word share its group: group sizes are multiples of 8), and
        # nibble j of each word row r is stored as row 8r + j, a contiguous BLOCK_N run (no interleave).
        offs_w = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (offs_w < KW)[:, None] & (offs_n < N)[None, :]
        q = tl.load(qw_ptr + offs_w[:, None] * stride_qk + offs_n[None, :], mask=mask, other=0)
        g = (offs_w * 8) // GROUP_SIZE
        z = tl.load(qz_ptr + g[:, None] * stride_zg + (offs_n // 8)[None, :], mask=mask, other=0)
        s = tl.load(sc_ptr + g[:, None] * stride_sg + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        zero = ((z >> ((offs_n % 8) * 4)[None, :]) & 0xF) + 1
        rows = w_ptr + (offs_w * 8)[:, None] * stride_wk + offs_n[None, :]
        for j in tl.static_range(8):
            w = (((q >> (4 * j)) & 0xF) - zero).to(tl.float32) * s
            tl.store(rows + j * stride_wk, w.to(w_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dequant4_tc_kernel(qw_ptr, qz_ptr, sc_ptr, w_ptr, N, stride_zg, stride_sg, stride_wk,
                            GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
        # one 128-row step x BLOCK_N columns of a tensor-core-layout weight: 16 words per column
        step = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (offs_n < N)[:, None]
        offs_c = tl.arange(0, 16)
        q = tl.load(qw_ptr + (step * N + offs_n)[:, None] * 16 + offs_c[None, :], mask=mask, other=0)
        g = step * 128 // GROUP_SIZE
        z = tl.load(qz_ptr + g * stride_zg + offs_n // 8, mask=offs_n < N, other=0)
        s = tl.load(sc_ptr + g * stride_sg + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
        zero = (((z >> ((offs_n % 8) * 4)) & 0xF) + 1)[:, None]
        rows = step * 128 + 2 * (offs_c // 4) + 32 * (offs_c % 4)  # row of nibble 0 of word c = 4t + v
        for j in tl.static_range(8):
            w = (((q >> (4 * j)) & 0xF) - zero).to(tl.float32) * s
            r = rows + (j // 4) + 8 * (j % 2) + 16 * ((j // 2) % 2)
            tl.store(w_ptr + r[None, :] * stride_wk + offs_n[:, None], w.to(w_ptr.dtype.element_ty), mask=mask)


def dequantize_w4(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype,
    layout: str = "gptq",
) -> torch.Tensor:
    """Dense ``W [K, N]`` in ``dtype`` from monotone-g_idx 4-bit tensors (Triton when usable, else torch);
    ``layout`` is ``PackedW4.layout`` ("tc": whole 128-row steps, each in one group)."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    if layout == "tc":
        if not triton_usable(qweight):
            return dequantize_w4(from_tc_layout(qweight), qzeros, scales, group_size, dtype)
        w = torch.empty(k, n, device=qweight.device, dtype=dtype)
        _dequant4_tc_kernel[(k // TC_STEP, triton.cdiv(n, 128))](
            qweight, qzeros.contiguous(), scales.contiguous(), w, n, qzeros.stride(0), scales.stride(0), w.stride(0),
            GROUP_SIZE=group_size, BLOCK_N=128,
        )
        return w
    if not triton_usable(qweight) or group_size % 8:  # the kernel needs each word's 8 rows in one group
        codes = unpack4_rows(qweight)
        zeros = unpack4_rows(qzeros.t().contiguous()).t() + 1
        g = torch.arange(k, device=qweight.device) // group_size
        return ((codes - zeros[g]).float() * scales.float()[g]).to(dtype)
    qweight, qzeros, scales = qweight.contiguous(), qzeros.contiguous(), scales.contiguous()
    w = torch.empty(k, n, device=qweight.device, dtype=dtype)
    # 128 K rows x 128 columns per program (7B shapes: 1.33-1.50x the per-element kernel it replaced,
    # benchmarks/results/dequant_h100_before.md vs dequant_h100.md); small weights take 64 x 64 tiles so that
    # every SM gets work
    bw, bn = (16, 128) if triton.cdiv(k // 8, 16) * triton.cdiv(n, 128) >= 256 else (8, 64)
    grid = (triton.cdiv(k // 8, bw), triton.cdiv(n, bn))
    _dequant4_kernel[grid](
        qweight, qzeros, scales, w, n, k // 8, qweight.stride(0), qzeros.stride(0), scales.stride(0), w.stride(0),
        GROUP_SIZE=group_size, BLOCK_W=bw, BLOCK_N=bn,
    )
    return w
