"""Tensor-core W4A16 for small batches (2 <= M <= 16) on CUDA: inline-PTX half2 unpack + ``tl.dot``.

Torch reference: ``inlaid.kernels.gptq_dequant.gptq_linear``; layout, act-order and ``PackedW4``:
``w4_layout``. The CPU-testable small-M kernel (``w4a16_small_m``) serves the same calls where this one
cannot run (the Triton interpreter has no inline assembly; group sizes below 128).

Design (the ``w4a16_small_m`` grid and epilogue; what differs is the unpack):
- grid ``(cdiv(N, BLOCK_N), SPLIT_K)``; a program owns BLOCK_N columns, all M (<= 16, padded to 16 for
  ``mma``) rows and a contiguous K range of 128-row steps, so each step lies in one quantization group
  (group size a multiple of 128, or one group);
- each step loads a ``[16, BLOCK_N]`` tile of int32 words (word row w holds input rows 8w..8w+7) and turns
  every word into 8 exact 16-bit values ``code - zero`` with 11 PTX instructions
  (``_unpack8``): ``lop3(word >> 4i, 0x000f000f, MAGIC)`` puts nibbles i and i + 4 into the mantissas of
  a half2 whose exponent makes it ``(MAGIC + code_i, MAGIC + code_{i+4})`` (fp16 ``0x6400`` = 1024, bf16
  ``0x4300`` = 128; exact), and one ``sub.{f16,bf16}x2`` of ``(MAGIC + zero)`` leaves ``code - zero``
  (|.| <= 16, exact in 16 bits); the multiply-adds run on tensor cores. Loop instructions per element
  (``python benchmarks/sass_count.py tc``): 3.40, vs 5.97 for the M = 1 FMA kernel's tuned tile;
- nibble j of every word of the tile is a ``[16, BLOCK_N]`` operand ``d_j`` whose K index is the word row,
  so step t is 8 ``tl.dot(x[:, 8w + j], d_j)`` (x gathered with the same stride-8 pattern; the sum over K
  does not care about the order). The fp32 result is scaled once per step (one group per step);
- split-K: "atomic_last" (``w4a16_gemv``'s MODE 4: atomic adds into a zeroed fp32 buffer, the tile's last
  program casts, stores and re-zeroes; one launch plus a memset when the caller's buffer is too small).
  No host sync, fixed shapes: CUDA-graph safe.

Measured on the H200 (``python benchmarks/small_m_tc_bench.py``, ``benchmarks/results/small_m_tc_h200.md``):
1.04-1.29x faster than ``w4a16_small_m`` at M = 2..16 on the Llama-2-7B shapes except 4096 x 4096 at M = 16
(0.95x); at M = 1 slower than the FMA GEMV (``tc_lab_h200_s6.json``), so the dispatcher keeps M = 1 there.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, kernels_interpreted, tl, triton
from .w4a16_gemv import _MODE_ID, check_kernel_inputs, check_out, splitk_buffers
from .w4a16_small_m import _num_sms

__all__ = ["TC_BLOCK_K", "tc_usable", "w4a16_tc"]

TC_BLOCK_K = 128
"""K rows per step: 16 word rows, the smallest K of an fp16/bf16 ``mma``; the group size must be a multiple."""
_MAGIC = {torch.float16: 0x6400, torch.bfloat16: 0x4300}


def tc_usable(x: torch.Tensor, group_size: int) -> bool:
    """True when ``w4a16_tc`` can serve ``x`` (CUDA, compiled Triton, fp16/bf16) with this kernel group size."""
    return (HAS_TRITON and x.is_cuda and not kernels_interpreted() and x.dtype in _MAGIC
            and group_size % TC_BLOCK_K == 0)


if HAS_TRITON:
    from .w4a16_gemv import _epilogue

    _ASM = """{
    .reg .b32 a, b, c, d, s;
    lop3.b32 a, $8, 0x000f000f, MAGIC, 0xea;
    shr.u32 s, $8, 4;
    lop3.b32 b, s, 0x000f000f, MAGIC, 0xea;
    shr.u32 s, $8, 8;
    lop3.b32 c, s, 0x000f000f, MAGIC, 0xea;
    shr.u32 s, $8, 12;
    lop3.b32 d, s, 0x000f000f, MAGIC, 0xea;
    sub.TYPEx2 a, a, $9;
    sub.TYPEx2 b, b, $9;
    sub.TYPEx2 c, c, $9;
    sub.TYPEx2 d, d, $9;
    mov.b32 {$0, $4}, a;
    mov.b32 {$1, $5}, b;
    mov.b32 {$2, $6}, c;
    mov.b32 {$3, $7}, d;
    }"""  # lop3 0xea = (a & b) | c
    _ASM_F16 = tl.constexpr(_ASM.replace("MAGIC", "0x64006400").replace("TYPE", "f16"))
    _ASM_BF16 = tl.constexpr(_ASM.replace("MAGIC", "0x43004300").replace("TYPE", "bf16"))

    @triton.jit
    def _unpack8(q, zz, BF16: tl.constexpr):
        """8 tensors ``code_j - zero`` (j = nibble) of the int32 words ``q``; ``zz`` = (MAGIC + zero) x 2."""
        if BF16:
            return tl.inline_asm_elementwise(_ASM_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [q, zz],
                                             dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(_ASM_F16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [q, zz],
                                             dtype=(tl.float16,) * 8, is_pure=True, pack=1)

    @triton.jit
    def _w4_tc_kernel(
        x_ptr, qw_ptr, qz_ptr, sc_ptr, out_ptr, ws_ptr, lock_ptr,
        M, N, K, k_per_split, n_split, stride_xm, stride_qk, stride_zg, stride_sg, stride_om,
        GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr, NUM_STAGES: tl.constexpr,
        BF16: tl.constexpr, MAGIC: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        BKW: tl.constexpr = 16
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_w = tl.arange(0, BKW)
        offs_m = tl.arange(0, 16)
        mask_m = offs_m < M
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        zshift = (offs_n % 8) * 4
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        for k0 in tl.range(k_lo, k_hi, 8 * BKW, num_stages=NUM_STAGES):
            rows = k0 // 8 + offs_w
            mask_w = rows * 8 < k_hi
            q = tl.load(qw_ptr + rows[:, None] * stride_qk + offs_n[None, :],
                        mask=mask_w[:, None] & mask_n[None, :], other=0, eviction_policy="evict_first")
            g = k0 // GROUP_SIZE
            s = tl.load(sc_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            z = tl.load(qz_ptr + g * stride_zg + offs_n // 8, mask=mask_n, other=0)
            zh = ((z >> zshift) & 0xF) + 1 + MAGIC  # the 16-bit pattern of MAGIC + zero (exact)
            d0, d1, d2, d3, d4, d5, d6, d7 = _unpack8(q, (zh | (zh << 16))[None, :], BF16)
            xp = x_ptr + offs_m[:, None] * stride_xm + k0 + offs_w[None, :] * 8  # x[:, 8w + j] pairs with d_j
            xm = mask_m[:, None] & mask_w[None, :]
            t = tl.dot(tl.load(xp, mask=xm, other=0.0), d0)
            t = tl.dot(tl.load(xp + 1, mask=xm, other=0.0), d1, t)
            t = tl.dot(tl.load(xp + 2, mask=xm, other=0.0), d2, t)
            t = tl.dot(tl.load(xp + 3, mask=xm, other=0.0), d3, t)
            t = tl.dot(tl.load(xp + 4, mask=xm, other=0.0), d4, t)
            t = tl.dot(tl.load(xp + 5, mask=xm, other=0.0), d5, t)
            t = tl.dot(tl.load(xp + 6, mask=xm, other=0.0), d6, t)
            t = tl.dot(tl.load(xp + 7, mask=xm, other=0.0), d7, t)
            acc += t * s[None, :]
        _epilogue(acc, out_ptr, ws_ptr, lock_ptr, offs_m, offs_n, M, N, stride_om, pid_k, pid_n, n_split, MODE)


def tc_split(k: int, n: int, block_n: int, sms: int, programs_per_sm: int = 2) -> tuple[int, int]:
    """``(split, k_per_split)``: ~``programs_per_sm`` programs per SM, whole 128-row steps, no empty split."""
    steps = -(-k // TC_BLOCK_K)
    want = max(1, min(round(programs_per_sm * sms / -(-n // block_n)), steps))
    per = -(-steps // want)
    return -(-steps // per), per * TC_BLOCK_K


def w4a16_tc(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    perm: torch.Tensor | None,
    group_size: int,
    out: torch.Tensor | None = None,
    locks: torch.Tensor | None = None,
    acc: torch.Tensor | None = None,
    block_n: int = 256,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """``x [M, K] @ W [K, N]`` for 1 <= M <= 16 on CUDA (``tc_usable``); [M, N] in x.dtype.

    ``locks`` (zeroed int32, >= cdiv(N, block_n) entries) and ``acc`` (zeroed fp32, >= M * N entries) are left
    zeroed (``PackedW4.locks`` / ``PackedW4.acc``); when missing or too short, zeroed buffers are allocated.
    Defaults (256 columns, 4 warps, 3 stages): the fastest of the four configs in ``small_m_tc_h200.md`` in 10
    of its 12 rows (the other two: 256 columns, 1 stage, within 1%).
    """
    gs = check_kernel_inputs(x, qweight, qzeros, scales, group_size, "w4a16_tc")
    if not tc_usable(x, gs):
        raise ValueError(f"w4a16_tc needs compiled Triton on CUDA, fp16/bf16 x and a group size that is a multiple "
                         f"of {TC_BLOCK_K} (got {x.dtype} on {x.device}, group {group_size}); use w4a16_linear")
    if not 0 <= x.shape[0] <= 16:
        raise ValueError(f"w4a16_tc serves M <= 16 rows, got {x.shape[0]}; use w4a16_linear")
    x = (x.index_select(1, perm) if perm is not None else x).contiguous()
    (m, k), n = x.shape, qweight.shape[1]
    out = check_out(out, x, m, n)
    if m == 0:
        return out
    split, k_per = tc_split(k, n, block_n, _num_sms(x.device.index or 0))
    n_tiles = triton.cdiv(n, block_n)
    mode = 0 if split == 1 else _MODE_ID["atomic_last"]
    ws, locks = splitk_buffers(out, split, mode, locks, n_tiles, acc)
    _w4_tc_kernel[(n_tiles, split)](
        x, qweight, qzeros, scales, out, ws, locks if mode else ws,
        m, n, k, k_per, split, x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), out.stride(0),
        GROUP_SIZE=gs, BLOCK_N=block_n, MODE=mode, NUM_STAGES=num_stages, BF16=x.dtype == torch.bfloat16,
        MAGIC=_MAGIC[x.dtype], num_warps=num_warps,
    )
    return out
