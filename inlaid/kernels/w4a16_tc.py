"""Tensor-core W4A16 on CUDA for 2 <= M <= ``TC_MAX_M``: inline-PTX half2 unpack + ``tl.dot``.

Torch reference: ``inlaid.kernels.gptq_dequant.gptq_linear``; layout, act-order and ``PackedW4``:
``w4_layout``. The CPU-testable small-M kernel (``w4a16_small_m``) serves M <= 16 where these cannot run
(the Triton interpreter has no inline assembly; group sizes below 128).

Shared design (the ``w4a16_small_m`` grid and epilogue; what differs is the unpack):
- grid ``(row tiles, cdiv(N, BLOCK_N), SPLIT_K)``; a program owns BLOCK_M rows (M padded to an ``mma``
  tile of 16/32/64, more rows take several row tiles; row tiles vary fastest so the programs sharing a
  weight tile run together), BLOCK_N columns and a contiguous K range of 128-row steps, so each step lies
  in one quantization group (group size a multiple of 128, or one group);
- each step loads a ``[16, BLOCK_N]`` tile of int32 words (word row w holds input rows 8w..8w+7) and turns
  every word into 8 exact 16-bit values ``code - zero`` with 11 PTX instructions
  (``_unpack8``): ``lop3(word >> 4i, 0x000f000f, MAGIC)`` puts nibbles i and i + 4 into the mantissas of
  a half2 whose exponent makes it ``(MAGIC + code_i, MAGIC + code_{i+4})`` (fp16 ``0x6400`` = 1024, bf16
  ``0x4300`` = 128; exact), and one ``sub.{f16,bf16}x2`` of ``(MAGIC + zero)`` leaves ``code - zero``
  (|.| <= 16, exact in 16 bits); the multiply-adds run on tensor cores. The fp32 product is scaled once per
  step (one group per step);
- split-K: "atomic" (``w4a16_gemv``'s MODE 3: atomic adds into a zeroed fp32 buffer, the caller's or the
  stream's shared ``splitk_scratch``; then ``cast_sums`` casts them into the outputs and re-zeroes them, as in
  ``w4a16_tcl``).
  No host sync, fixed shapes: CUDA-graph safe.

Two step forms (``_tc_tile``; constexpr ``NATURAL``), by how the unpacked nibbles meet x:
- the 8-dot step (M <= 16): nibble j of every word is a ``[16, BLOCK_N]`` operand ``d_j`` whose K index is
  the word row, so a step is 8 ``tl.dot(x[:, 8w + j], d_j)`` with K = 16 (x gathered with the same stride-8
  pattern; the sum over K does not care about the order). ``mma.sync`` on register operands; loop
  instructions per element (``python benchmarks/sass_count.py tc --stages 2``): 3.30;
- the natural-order step (``NATURAL``, M > 16): the 8 nibble tiles are interleaved back into row order in registers
  (``join`` + ``permute`` + ``reshape``: row 8w + j), x is one contiguous ``[BLOCK_M, 128]`` tile (pipelined
  like any ``tl.dot`` operand) and a step is ONE ``tl.dot`` with K = 128. At 64-row tiles this is a single
  wgmma chain per step; the 8-dot form there issues 8 shared-memory round trips with fences (SASS loop at
  64 x 128, 8 warps: 378 instructions vs 568: ``python benchmarks/sass_count.py tc [--natural] --block-m 64
  --block-n 128 --warps 8``), and was 2-3.5x slower at M >= 64 (``benchmarks/results/tc_sweep_h200.md``).

Swapped operands (``SWAP``, the default above 16 rows): the tile computes out^T = W^T x^T, so the unpacked
weights are wgmma's operand A, which it reads from registers (``HGMMA ... R, gdesc`` in the SASS; the natural
step's relayout still passes through shared memory: STS + LDSM), x^T is operand B, and M becomes the MMA's N
(8..256 in steps of 8): M = 32 runs a 32-row tile with no padding, where the unswapped form needs the 64-row
wgmma M. H200, geometric mean over the three 7B shapes
(``tc_swap_large_h200.md``): 9% / 3% / 7% faster than the unswapped default at M = 32 / 64 / 128. At M <= 16
the swapped forms (natural, and a swapped 8-dot step since removed: commit 927314b) lost to the 8-dot step
(``tc_swap_small_h200.md``).

Measured on the H200 (``benchmarks/results/tc_sweep_h200.md``, one run, CUDA graphs over weight copies > 3x L2):
M = 2..16 1.05-1.50x fp16 cuBLAS (the small-M kernel: 0.91-1.11x); M = 64 and 128: 1.8-2.4x and 1.25-1.6x
faster than the dispatcher's previous path (tiled kernel / dequantize + cuBLAS), but still 0.44-0.93x cuBLAS;
M = 256: slower than dequantize + cuBLAS, hence ``TC_MAX_M``. At M = 1 the FMA GEMV is faster.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._triton import HAS_TRITON, kernels_interpreted, tl, triton
from .w4_layout import PackedW4, kernel_group_size
from .w4a16_gemv import (
    _pow2,
    atomic_mode,
    check_kernel_inputs,
    check_out,
    finish_group,
    finish_splitk,
    group_args,
    group_buffers,
    share_input,
    splitk_buffers,
)
from .w4a16_small_m import _num_sms

__all__ = ["TC_BLOCK_K", "TC_MAX_M", "TcConfig", "tc_config", "tc_usable", "w4a16_tc", "w4a16_tc_group"]

TC_BLOCK_K = 128
"""K rows per step: 16 word rows, the smallest K of an fp16/bf16 ``mma``; the group size must be a multiple."""
TC_MAX_M = 128
"""Largest M ``w4a16_linear`` sends here: at 256 rows dequantize + cuBLAS was faster on all three Llama-2-7B
shapes, at 128 this kernel was (``benchmarks/results/tc_sweep_h200.md``)."""
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
    def _step_weights(qw_ptr, qz_ptr, sc_ptr, k0, k_hi, offs_w, offs_n, mask_n, stride_qk, stride_zg, stride_sg,
                      GROUP_SIZE: tl.constexpr, BF16: tl.constexpr, MAGIC: tl.constexpr):
        """One 128-row step's weights: the 8 nibble tiles ``code - zero`` [16, BLOCK_N], the fp32 scales of the
        step's group [BLOCK_N] and the mask of word rows inside the program's K range."""
        rows = k0 // 8 + offs_w
        mask_w = rows * 8 < k_hi
        q = tl.load(qw_ptr + rows[:, None] * stride_qk + offs_n[None, :],
                    mask=mask_w[:, None] & mask_n[None, :], other=0, eviction_policy="evict_first")
        g = k0 // GROUP_SIZE
        s = tl.load(sc_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(qz_ptr + g * stride_zg + offs_n // 8, mask=mask_n, other=0)
        zh = ((z >> ((offs_n % 8) * 4)) & 0xF) + 1 + MAGIC  # the 16-bit pattern of MAGIC + zero (exact)
        d0, d1, d2, d3, d4, d5, d6, d7 = _unpack8(q, (zh | (zh << 16))[None, :], BF16)
        return d0, d1, d2, d3, d4, d5, d6, d7, s, mask_w

    @triton.jit
    def _tc_tile(x_ptr, qw_ptr, qz_ptr, sc_ptr, out_ptr, ws_ptr, lock_ptr, M, N, K, k_per_split, n_split, stride_xm,
                 stride_qk, stride_zg, stride_sg, stride_om, pid_m, pid_n, pid_k, m_tiles,
                 GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr,
                 NUM_STAGES: tl.constexpr, BF16: tl.constexpr, MAGIC: tl.constexpr, NATURAL: tl.constexpr,
                 SWAP: tl.constexpr):
        """One program: row tile ``pid_m`` (of ``m_tiles``), column tile ``pid_n``, K range ``pid_k``; the 8-dot
        step, or with ``NATURAL`` the row-order step, with ``SWAP`` on swapped operands (module docstring)."""
        tl.static_assert(NATURAL or not SWAP, "swapped operands need the natural-order step")
        BKW: tl.constexpr = 16
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_w = tl.arange(0, BKW)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        if SWAP:  # out^T = W^T x^T: the unpacked weights are wgmma's register operand A, x^T operand B
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in tl.range(k_lo, k_hi, 8 * BKW, num_stages=NUM_STAGES):
            d0, d1, d2, d3, d4, d5, d6, d7, s, mask_w = _step_weights(
                qw_ptr, qz_ptr, sc_ptr, k0, k_hi, offs_w, offs_n, mask_n, stride_qk, stride_zg, stride_sg,
                GROUP_SIZE, BF16, MAGIC)
            if NATURAL:
                # e[w, n, c, b, a] = d_{4a + 2b + c}[w, n]; permuted to [w, a, b, c, n] its rows read 8w + j, the
                # input-row order, so x needs no gather (the compiler keeps this a register/shared-memory relayout)
                e = tl.join(tl.join(tl.join(d0, d1), tl.join(d2, d3)), tl.join(tl.join(d4, d5), tl.join(d6, d7)))
                xk = k0 + tl.arange(0, 8 * BKW)
                if SWAP:
                    w = tl.reshape(tl.permute(e, (1, 0, 4, 3, 2)), (BLOCK_N, 8 * BKW))
                    xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + xk[:, None],
                                 mask=mask_m[None, :] & (xk < k_hi)[:, None], other=0.0)
                    acc += tl.dot(w, xt) * s[:, None]
                else:
                    w = tl.reshape(tl.permute(e, (0, 4, 3, 2, 1)), (8 * BKW, BLOCK_N))
                    xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + xk[None, :],
                                 mask=mask_m[:, None] & (xk < k_hi)[None, :], other=0.0)
                    acc += tl.dot(xt, w) * s[None, :]
            else:
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
        if SWAP:
            acc = tl.trans(acc)
        tile = pid_n * m_tiles + pid_m
        _epilogue(acc, out_ptr, ws_ptr, lock_ptr, offs_m, offs_n, M, N, stride_om, pid_k, tile, n_split, MODE)

    @triton.jit
    def _w4_tc_kernel(
        x_ptr, qw_ptr, qz_ptr, sc_ptr, out_ptr, ws_ptr, lock_ptr,
        M, N, K, k_per_split, n_split, stride_xm, stride_qk, stride_zg, stride_sg, stride_om,
        GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr,
        NUM_STAGES: tl.constexpr, BF16: tl.constexpr, MAGIC: tl.constexpr, NATURAL: tl.constexpr, SWAP: tl.constexpr,
    ):
        # row tiles vary fastest in launch order: the programs that unpack the same weight tile run together
        # and share its L2 lines (one row tile whenever M <= BLOCK_M)
        _tc_tile(x_ptr, qw_ptr, qz_ptr, sc_ptr, out_ptr, ws_ptr, lock_ptr, M, N, K, k_per_split, n_split, stride_xm,
                 stride_qk, stride_zg, stride_sg, stride_om, tl.program_id(0), tl.program_id(1), tl.program_id(2),
                 tl.num_programs(0), GROUP_SIZE, BLOCK_M, BLOCK_N, MODE, NUM_STAGES, BF16, MAGIC, NATURAL, SWAP)

    @triton.jit
    def _w4_tc_group_kernel(
        x_ptr, M, K, k_per_split, n_split, stride_xm, nt0, nt1,
        qw0, qz0, sc0, out0, ws0, lk0, n0, qw1, qz1, sc1, out1, ws1, lk1, n1, qw2, qz2, sc2, out2, ws2, lk2, n2,
        GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr,
        NUM_STAGES: tl.constexpr, BF16: tl.constexpr, MAGIC: tl.constexpr, NATURAL: tl.constexpr, SWAP: tl.constexpr,
    ):
        """``_w4_tc_kernel`` for 2-3 weights of one x in one launch: column tile ``pid`` belongs to weight 0 below
        ``nt0`` tiles, weight 1 below ``nt0 + nt1``, else weight 2 (contiguous tensors and outputs)."""
        pid_m = tl.program_id(0)
        pid = tl.program_id(1)
        pid_k = tl.program_id(2)
        mt = tl.num_programs(0)
        if pid < nt0:
            _tc_tile(x_ptr, qw0, qz0, sc0, out0, ws0, lk0, M, n0, K, k_per_split, n_split, stride_xm, n0, n0 // 8,
                     n0, n0, pid_m, pid, pid_k, mt, GROUP_SIZE, BLOCK_M, BLOCK_N, MODE, NUM_STAGES, BF16, MAGIC,
                     NATURAL, SWAP)
        elif pid < nt0 + nt1:
            _tc_tile(x_ptr, qw1, qz1, sc1, out1, ws1, lk1, M, n1, K, k_per_split, n_split, stride_xm, n1, n1 // 8,
                     n1, n1, pid_m, pid - nt0, pid_k, mt, GROUP_SIZE, BLOCK_M, BLOCK_N, MODE, NUM_STAGES, BF16, MAGIC,
                     NATURAL, SWAP)
        else:
            _tc_tile(x_ptr, qw2, qz2, sc2, out2, ws2, lk2, M, n2, K, k_per_split, n_split, stride_xm, n2, n2 // 8,
                     n2, n2, pid_m, pid - nt0 - nt1, pid_k, mt, GROUP_SIZE, BLOCK_M, BLOCK_N, MODE, NUM_STAGES, BF16,
                     MAGIC, NATURAL, SWAP)


@dataclass(frozen=True)
class TcConfig:
    """Launch configuration of ``w4a16_tc`` (``tc_config(m, n)`` gives the measured default)."""

    block_m: int = 16
    """Rows per program: a power of two >= 16; M beyond it takes several row tiles."""
    block_n: int = 256
    num_warps: int = 4
    num_stages: int = 2
    programs_per_sm: float = 2
    """Split K until about this many programs per SM (``tc_split``)."""
    natural: bool = False
    """The natural-order step (one K = 128 dot per step) instead of the 8-dot step (``NATURAL``)."""
    swap: bool = False
    """Compute out^T = W^T x^T (``SWAP``, natural step only): the unpacked weights are the MMA's register operand
    A, M its N."""

    def __post_init__(self) -> None:
        if not (_pow2(self.block_m) and _pow2(self.block_n) and self.block_m >= 16 and self.block_n >= 16):
            raise ValueError(f"block_m and block_n must be powers of two >= 16: {self}")
        if self.num_warps < 1 or self.num_stages < 1 or self.programs_per_sm <= 0:
            raise ValueError(f"num_warps, num_stages and programs_per_sm must be positive: {self}")
        if self.swap and not self.natural:
            raise ValueError(f"swap needs the natural-order step (natural=True): {self}")


def tc_config(m: int, n: int = 4096) -> TcConfig:
    """The default for M rows and N output columns: the fastest config (geometric mean over the Llama-2-7B
    shapes) of the H200 sweeps (``benchmarks/results/tc_sweep_h200.md``, ``tc_swap_*_h200.md``) in M's bucket."""
    if m <= 16:  # 8-dot step, 16-row tile: the fastest 8-dot config at M = 2, 4, 8 on all three shapes, within
        return TcConfig(16, 256, 4, 2, 2, False)  # 1.8% of the best at 16 (tc_n256_w4_s2_p2 in the sweep)
    # M > 16: swapped operands (out^T = W^T x^T, M as the wgmma N), natural order, 64 columns: the fastest of 41
    # swapped configs at M = 32 / 64 / 128 on tiles of min(64, M) rows, 9% / 3% / 7% faster than the unswapped
    # 64-row tile (geometric means, tc_swap_large_h200.md). Above 64 rows one 128-row tile with 2 stages is
    # faster still where N <= 4096 (4096x4096 26.6 -> 22.6 us, 11008x4096 61.3 -> 47.2 at M = 96) but slower at
    # N = 11008 (60.6 -> 69.1), which keeps 64-row tiles (tc_swap_bm128_h200.md)
    if m > 64 and n <= 4096:
        return TcConfig(128, 64, 4, 2, 2, True, True)
    return TcConfig(min(64, 1 << (m - 1).bit_length()), 64, 4, 3, 2, True, True)


def tc_split(k: int, n: int, block_n: int, sms: int, programs_per_sm: float = 2, m_tiles: int = 1) -> tuple[int, int]:
    """``(split, k_per_split)``: ~``programs_per_sm`` programs per SM, whole 128-row steps, no empty split."""
    steps = -(-k // TC_BLOCK_K)
    want = max(1, min(round(programs_per_sm * sms / (-(-n // block_n) * m_tiles)), steps))
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
    config: TcConfig | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W [K, N]`` on CUDA (``tc_usable``); [M, N] in x.dtype; ``config`` default ``tc_config(M, N)``.

    ``locks`` (zeroed int32, >= row tiles x cdiv(N, block_n) entries) and ``acc`` (zeroed fp32, >= M * N
    entries) are left zeroed (``PackedW4.locks`` / ``PackedW4.acc``); when missing or too short, the
    stream's shared split-K scratch serves (``w4a16_gemv.splitk_scratch``).
    """
    gs = check_kernel_inputs(x, qweight, qzeros, scales, group_size, "w4a16_tc")
    if not tc_usable(x, gs):
        raise ValueError(f"w4a16_tc needs compiled Triton on CUDA, fp16/bf16 x and a group size that is a multiple "
                         f"of {TC_BLOCK_K} (got {x.dtype} on {x.device}, group {group_size}); use w4a16_linear")
    x = (x.index_select(1, perm) if perm is not None else x).contiguous()
    (m, k), n = x.shape, qweight.shape[1]
    out = check_out(out, x, m, n)
    if m == 0:
        return out
    cfg = config or tc_config(m, n)
    m_tiles, n_tiles = triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n)
    split, k_per = tc_split(k, n, cfg.block_n, _num_sms(x.device.index or 0), cfg.programs_per_sm, m_tiles)
    mode = atomic_mode(split)
    ws, locks = splitk_buffers(out, split, mode, locks, m_tiles * n_tiles, acc)
    _w4_tc_kernel[(m_tiles, n_tiles, split)](
        x, qweight, qzeros, scales, out, ws, locks if mode else ws,
        m, n, k, k_per, split, x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), out.stride(0),
        GROUP_SIZE=gs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, MODE=mode, NUM_STAGES=cfg.num_stages,
        BF16=x.dtype == torch.bfloat16, MAGIC=_MAGIC[x.dtype], NATURAL=cfg.natural, SWAP=cfg.swap,
        num_warps=cfg.num_warps,
    )
    finish_splitk(ws, out, split, mode)
    return out


def w4a16_tc_group(x: torch.Tensor, packs: Sequence[PackedW4], config: TcConfig | None = None) -> list[torch.Tensor]:
    """``[x @ W_j]`` for 2-3 weights that read ``x`` [M, K] (q/k/v, gate/up) in ONE launch of ``w4a16_tc``'s kernel
    (``share_input`` and ``tc_usable`` must hold). Outputs [M, N_j] in x.dtype. The split-K sums and semaphores
    come from the stream's shared scratch, one slice per weight, left zeroed.

    Correct for any M (GPU tests to M = 100), but only faster than one launch per weight with the 8-dot step:
    H200, ``benchmarks/results/gemv_group_h200.md``: M = 8 1.14-1.70x; M = 32 (natural-order step) 0.67-0.78x on
    the 7B shapes (1.25x for GQA-8 q/k/v). A reading, not profiled: the branch around each member's pipelined
    wgmma loop costs the natural form its pipelining. ``w4a16_linear_group`` therefore uses it up to 16 rows."""
    gs = kernel_group_size(packs[0].group_size, packs[0].in_features) if packs else 0
    if not share_input(x, packs) or not tc_usable(x, gs):
        raise ValueError("w4a16_tc_group needs x [M, K] on CUDA (fp16/bf16) and 2-3 contiguous 4-bit weights with the "
                         f"same K, group size (a multiple of {TC_BLOCK_K}) and permutation tensor; use w4a16_tc")
    for p in packs:
        check_kernel_inputs(x, p.qweight, p.qzeros, p.scales, p.group_size, "w4a16_tc_group")
    perm = packs[0].perm
    x = (x.index_select(1, perm) if perm is not None else x).contiguous()
    (m, k), widths = x.shape, [p.out_features for p in packs]
    outs = [torch.empty(m, n, device=x.device, dtype=x.dtype) for n in widths]
    if m == 0:
        return outs
    cfg = config or tc_config(m, max(widths))
    m_tiles = triton.cdiv(m, cfg.block_m)
    tiles = [triton.cdiv(n, cfg.block_n) for n in widths]
    split, k_per = tc_split(k, sum(widths), cfg.block_n, _num_sms(x.device.index or 0), cfg.programs_per_sm,
                            m_tiles)
    mode = atomic_mode(split)
    bufs, sums = group_buffers(outs, split, mode, m_tiles, tiles)
    _w4_tc_group_kernel[(m_tiles, sum(tiles), split)](
        x, m, k, k_per, split, x.stride(0), tiles[0], tiles[1], *group_args(packs, outs, bufs),
        GROUP_SIZE=gs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, MODE=mode, NUM_STAGES=cfg.num_stages,
        BF16=x.dtype == torch.bfloat16, MAGIC=_MAGIC[x.dtype], NATURAL=cfg.natural, SWAP=cfg.swap,
        num_warps=cfg.num_warps,
    )
    finish_group(bufs, sums, outs, split, mode)
    return outs
