"""Small-M W4A16 (GEMV / skinny GEMM, M <= 16) on monotone 4-bit GPTQ tensors: Triton kernel + launcher.

Torch reference: ``inlaid.kernels.gptq_dequant.gptq_linear`` (dequantize in
fp32, cast once, matmul); layout and invariants: ``w4_layout``.

Design (bandwidth-bound: every packed word is read from DRAM exactly once):
- grid ``(cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M))``: a program owns
  BLOCK_N output columns and a contiguous K range (a multiple of BLOCK_K);
- each K step loads a ``[BLOCK_K/8, BLOCK_N]`` tile of int32 words, contiguous
  along N (coalesced), and unpacks nibble j of every word with a static shift.
  Codes become fp32 without an int->float convert: ``(c | 0x4B000000)`` read
  as fp32 is ``2**23 + c``, and subtracting ``2**23 + zero`` is exact, so
  ``d = c - zero`` costs shift, and/or, sub per element; the scale multiplies
  the tile (FMA path: 2-4 rows share one scaled tile, to save registers) or
  the ``tl.dot`` result once per tile (one group per tile; ``d`` is exact in
  fp16/bf16, so the tensor-core operand carries no rounding);
- groups: when BLOCK_K divides the group size a tile has one scale/zero row;
  otherwise (group 32/64 under a longer tile, or a partial last group) each
  word row gathers its own (cached) scale/zero row. Rows past K are masked;
- ``use_dot=False`` (M 2..4): fp32 FMAs against x rows, one ``[BLOCK_K/8,
  BLOCK_N]`` accumulator per row (BLOCK_M <= 4, no tensor cores), reduced
  once at the end; ``use_dot=True`` (M 5..16, or any M): 8 ``tl.dot`` of
  K = BLOCK_K/8 per step with M padded to 16;
- M = 1 without ``use_dot`` (the decode case; ``_w4_gemv_m1_kernel``), with
  BLOCK_K halved until one group covers a step (``m1_fit``):
  x is loaded once per step as a contiguous ``[BLOCK_K/8, 8]`` slice and
  split into its 8 nibble columns; nibble j (and j + 4 of ``word >> 16``) is
  turned into fp32 without a shift: ``(word & 0xF << 4j) | exponent(2**(23-4j))``
  reads as ``2**(23-4j) + code``, so each element costs one LOP3, one FADD
  and one FFMA (``benchmarks/gemv_m1_bench.py`` measures it);
- M = 1, fp16/bf16 x on a GPU (``half2_path``): the same tile in half2 PTX,
  3.25-3.65 SASS instructions per element against the fp32 tile's 5.1-6.0
  (``benchmarks/sass_count.py m1 [--half2]``), because the fp32 tile is
  issue-bound (at 11008x4096 a read-only kernel on the same grid takes
  9.7 us, the fp32 tile 16.5-18.4 us: ``benchmarks/gemv_read_floor.py``,
  ``benchmarks/results/gemv_read_floor_h100.md``). Nibbles j and
  j + 4 sit in the two 16-bit halves of a word, so one LOP3 with
  ``0x64006400`` makes the half2 (1024 + code_j, 1024 + code_j+4) (nibbles
  1 and 3 land 16x higher and are scaled by 1/16 in the same HFMA2 that
  subtracts 1024 + zero): exact fp16 ``code - zero`` in [-16, 14] for two
  elements per instruction. Four HFMA2 then sum the word's 8 products
  against ``x' = x * 2**-7`` in fp16: |x'| <= 512 for any fp16 x, so a sum
  of four products (|code - zero| <= 16) stays within 2**15 and never
  overflows (bf16 x can overflow a word's sum only beyond |x| ~ 131,000);
  x' is made in fp32 and rounded to fp16 in PTX (``_fp16_opaque``). The two
  halves join in fp32, the scale multiplies once per word and the result is
  multiplied by 128 once per tile. Rounding: each word's 8-term partial sum
  carries fp16 (11-bit) rounding, ~2x the fp32 tile's error against an fp64
  reference and below the fp16 output's own rounding of a K-term sum;
- split-K partials (fp32) are combined by ``mode``: "reduce" (workspace
  [SPLIT_K, M, N] + a second tiny kernel), "fixup" (one launch: the last
  program of a tile, found with a per-tile semaphore, sums, casts and stores,
  then resets the semaphore so the zeroed buffer stays reusable and the call
  is CUDA-graph safe), "atomic" (fp32 ``atomic_add`` into the same zeroed
  sums as "atomic_last", then ``cast_sums``: one more launch casts them into
  ``out`` and re-zeroes them) or "atomic_last" (one launch: atomic adds
  into the caller's zeroed fp32 row ``PackedW4.acc``; the tile's last
  program, found with the fixup's semaphore, casts the sum into ``out`` and
  re-zeroes the row: no memset and no cast kernel per call).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ._triton import (
    HAS_TRITON,
    dot_f32,
    kernels_interpreted,
    pdl_options,
    tl,
    triton,
    triton_usable,
)
from .w4_layout import PackedW4, check_w4, kernel_group_size

__all__ = [
    "GEMV_MAX_M",
    "GemvConfig",
    "PendingSums",
    "default_gemv_config",
    "gemv_block_m",
    "half2_path",
    "kernels_interpreted",
    "m1_fit",
    "m1_groupable",
    "share_input",
    "triton_usable",
    "w4a16_gemv",
    "w4a16_gemv_m1_group",
]

GEMV_MAX_M = 16
"""Largest M the GEMV kernel serves (the dispatcher's default)."""
X_SCALE = 2**-7
"""The half2 steps' x' = x * 2**-7 (``H2_X_SCALE`` in the kernels; ``rms_norm``'s ``x_half`` copy, also on its
torch path)."""
MODES = ("reduce", "fixup", "atomic", "atomic_last")
_MODE_ID = {"reduce": 1, "fixup": 2, "atomic": 3, "atomic_last": 4}


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@dataclass(frozen=True)
class GemvConfig:
    """Tile configuration of the GEMV kernel (block sizes powers of two; block_m follows from M and use_dot)."""

    block_n: int = 128
    block_k: int = 128
    split_k: int = 8
    num_warps: int = 4
    use_dot: bool = False
    mode: str = "fixup"
    """How split-K partials are summed: "reduce", "fixup", "atomic" or "atomic_last" (the module docstring)."""
    num_stages: int = 2

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"GemvConfig.mode must be one of {MODES}, got {self.mode!r}")
        if not (_pow2(self.block_n) and _pow2(self.block_k) and self.block_k >= 8 and self.block_n >= 16):
            raise ValueError(f"block_n (>= 16) and block_k (>= 8) must be powers of two: {self}")
        if self.use_dot and self.block_k < 128:
            raise ValueError(f"use_dot needs block_k >= 128 (tl.dot of K = block_k/8 >= 16): {self}")
        if self.split_k < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"split_k, num_warps and num_stages must be >= 1: {self}")

    def to_dict(self) -> dict:
        return {"block_n": self.block_n, "block_k": self.block_k, "split_k": self.split_k,
                "num_warps": self.num_warps, "use_dot": self.use_dot, "mode": self.mode,
                "num_stages": self.num_stages}  # fmt: skip


def gemv_block_m(m: int, use_dot: bool) -> int:
    """Rows per program: 16 with tl.dot, else the next power of two >= M capped at 4."""
    return 16 if use_dot else min(4, 1 << max(0, (m - 1).bit_length()))


def default_gemv_config(m: int, n: int, k: int, num_sms: int = 132) -> GemvConfig:
    """Untuned fallback (used when the tuned table has no entry): ~4 programs per SM, >= 2 K steps each.

    M = 1 (the decode kernel), one-launch "atomic_last" split-K, K steps of 64: for N >= 4096 ~4 programs per
    SM of 512 columns and no pipelining (the half2 tile's fastest config on all three Llama-2-7B shapes in the
    session-10 H100 sweep, ``benchmarks/results/gemv_m1_h100_half2.json``); narrower outputs ~2 programs per SM
    of 256 columns, three stages (the fp32 tile's session-6 H200 winner, ``gemv_m1_h200.json``).
    """
    if m == 1:
        bn, per_sm, stages = (512, 4, 1) if n >= 4096 else (256, 2, 3)
        split = max(1, min(round(per_sm * num_sms / -(-n // bn)), -(-k // 64), 64))
        return GemvConfig(bn, 64, split, 4, False, "atomic_last", stages)
    use_dot = m > 4
    bn, bk = (64, 128) if use_dot else (128, 128)
    k_tiles = -(-k // bk)
    split = max(1, min(-(-4 * num_sms // -(-n // bn)), k_tiles // 2, 32))
    return GemvConfig(bn, bk, split, 4, use_dot, "fixup", 2)


if HAS_TRITON:
    from ._triton import pdl_enter

    @triton.jit
    def _scale_zero(qz_ptr, sc_ptr, k0, rows, mask_w, offs_n, mask_n, stride_zg, stride_sg,
                    GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
        """fp32 scale and ``2**23 + zero`` of a K tile: [1, BN] (one group) or [BLOCK_K/8, BN] (per word row)."""
        zshift = (offs_n % 8) * 4
        if GROUP_SIZE % BLOCK_K == 0:
            g = k0 // GROUP_SIZE
            s = tl.load(sc_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            z = tl.load(qz_ptr + g * stride_zg + offs_n // 8, mask=mask_n, other=0)
            zm = (((z >> zshift) & 0xF) + 1).to(tl.float32)[None, :] + 8388608.0
        else:
            g = (rows * 8) // GROUP_SIZE
            gm = mask_w[:, None] & mask_n[None, :]
            s = tl.load(sc_ptr + g[:, None] * stride_sg + offs_n[None, :], mask=gm, other=0.0).to(tl.float32)
            z = tl.load(qz_ptr + g[:, None] * stride_zg + (offs_n // 8)[None, :], mask=gm, other=0)
            zm = (((z >> zshift[None, :]) & 0xF) + 1).to(tl.float32) + 8388608.0
        return s, zm

    @triton.jit
    def _fma_row(acc, x_ptr, row, M, stride_xm, kj, mask_w, w):
        xr = tl.load(x_ptr + row * stride_xm + kj, mask=mask_w & ((kj * 0 + row) < M), other=0.0).to(tl.float32)
        return acc + xr[:, None] * w

    @triton.jit
    def _w4_gemv_kernel(
        x_ptr, qw_ptr, qz_ptr, sc_ptr, out_ptr, ws_ptr, lock_ptr,
        M, N, K, k_per_split, n_split, stride_xm, stride_qk, stride_zg, stride_sg, stride_om,
        GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        MODE: tl.constexpr, USE_DOT: tl.constexpr,
        DOT_F32: tl.constexpr, NUM_STAGES: tl.constexpr,
    ):
        # MODE 0: store out (n_split == 1); 1: partials to ws (reduce kernel follows); 2: fixup; 3: atomic_add to ws;
        # 4: atomic_add to a zeroed ws that the tile's last program casts into out and re-zeroes.
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        m0 = tl.program_id(2) * BLOCK_M
        BKW: tl.constexpr = BLOCK_K // 8
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_w = tl.arange(0, BKW)
        mask_n = offs_n < N
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        a0 = tl.zeros((BKW, BLOCK_N), dtype=tl.float32)
        a1 = tl.zeros((BKW, BLOCK_N), dtype=tl.float32)
        a2 = tl.zeros((BKW, BLOCK_N), dtype=tl.float32)
        a3 = tl.zeros((BKW, BLOCK_N), dtype=tl.float32)
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):
            rows = k0 // 8 + offs_w
            mask_w = rows * 8 < k_hi
            q = tl.load(qw_ptr + rows[:, None] * stride_qk + offs_n[None, :], mask=mask_w[:, None] & mask_n[None, :],
                        other=0)
            s, zm = _scale_zero(qz_ptr, sc_ptr, k0, rows, mask_w, offs_n, mask_n, stride_zg, stride_sg,
                                GROUP_SIZE, BLOCK_K)
            # d = code - zero (exact small integers); the scale is applied once per word row after the 8 nibbles
            # (a word's 8 rows share a group: group_size % 8 == 0), not per element.
            t = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(8):
                d = (((q >> (4 * j)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - zm  # [BKW, BN]
                kj = k0 + offs_w * 8 + j
                if USE_DOT:
                    if GROUP_SIZE % BLOCK_K != 0:  # scales differ between word rows: scale before the dot
                        d = d * s
                    xj = tl.load(x_ptr + offs_m[:, None] * stride_xm + kj[None, :],
                                 mask=(offs_m < M)[:, None] & mask_w[None, :], other=0.0)
                    if DOT_F32:  # fp32 inputs, or bf16 under the interpreter (its bf16 dot is wrong)
                        t += tl.dot(xj.to(tl.float32), d, input_precision="ieee")
                    else:
                        t += tl.dot(xj, d.to(xj.dtype))  # exact: |code - zero| <= 16
                else:  # 2-4 rows share one scaled weight tile (no per-row partial sums: registers); M = 1 runs
                    # _w4_gemv_m1_kernel
                    w = d * s
                    a0 = _fma_row(a0, x_ptr, m0, M, stride_xm, kj, mask_w, w)
                    a1 = _fma_row(a1, x_ptr, m0 + 1, M, stride_xm, kj, mask_w, w)
                    if BLOCK_M > 2:
                        a2 = _fma_row(a2, x_ptr, m0 + 2, M, stride_xm, kj, mask_w, w)
                        a3 = _fma_row(a3, x_ptr, m0 + 3, M, stride_xm, kj, mask_w, w)
            if USE_DOT:
                if GROUP_SIZE % BLOCK_K == 0:
                    acc += t * s
                else:
                    acc += t
        if not USE_DOT:  # assemble the [BLOCK_M, BN] result from the per-row accumulators (once)
            r = tl.arange(0, BLOCK_M)[:, None]
            acc = tl.where(r == 0, tl.sum(a0, axis=0)[None, :], 0.0)
            if BLOCK_M > 1:
                acc += tl.where(r == 1, tl.sum(a1, axis=0)[None, :], 0.0)
            if BLOCK_M > 2:
                acc += tl.where(r == 2, tl.sum(a2, axis=0)[None, :], 0.0)
                acc += tl.where(r == 3, tl.sum(a3, axis=0)[None, :], 0.0)
        _epilogue(acc, out_ptr, ws_ptr, lock_ptr, offs_m, offs_n, M, N, stride_om, pid_k,
                  tl.program_id(2) * tl.num_programs(0) + pid_n, n_split, MODE)

    @triton.jit
    def _w4_gemv_m1_kernel(
        x_ptr, qw_ptr, qz_ptr, sc_ptr, out_ptr, ws_ptr, lock_ptr,
        N, K, k_per_split, n_split, stride_qk, stride_zg, stride_sg, stride_om,
        GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr,
        NUM_STAGES: tl.constexpr, HALF2: tl.constexpr,
    ):
        # M = 1 and GROUP_SIZE % BLOCK_K == 0 (one scale/zero row per tile); MODE as in _w4_gemv_kernel.
        _m1_tile(x_ptr, qw_ptr, qz_ptr, sc_ptr, out_ptr, ws_ptr, lock_ptr, N, K, k_per_split, n_split, stride_qk,
                 stride_zg, stride_sg, stride_om, tl.program_id(0), tl.program_id(1), GROUP_SIZE, BLOCK_N, BLOCK_K,
                 MODE, NUM_STAGES, HALF2)

    @triton.jit
    def _w4_gemv_m1_group_kernel(
        x_ptr, K, k_per_split, n_split, nt0, nt1,
        qw0, qz0, sc0, out0, ws0, lk0, n0, qw1, qz1, sc1, out1, ws1, lk1, n1, qw2, qz2, sc2, out2, ws2, lk2, n2,
        GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr,
        NUM_STAGES: tl.constexpr, HALF2: tl.constexpr,
    ):
        """``_w4_gemv_m1_kernel`` for 2-3 weights of one x (q/k/v, gate/up) in one launch: column tile ``pid``
        belongs to weight 0 below ``nt0`` tiles, weight 1 below ``nt0 + nt1``, else weight 2 (contiguous
        tensors: row strides are the widths)."""
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        if pid < nt0:
            _m1_tile(x_ptr, qw0, qz0, sc0, out0, ws0, lk0, n0, K, k_per_split, n_split, n0, n0 // 8, n0, n0, pid,
                     pid_k, GROUP_SIZE, BLOCK_N, BLOCK_K, MODE, NUM_STAGES, HALF2)
        elif pid < nt0 + nt1:
            _m1_tile(x_ptr, qw1, qz1, sc1, out1, ws1, lk1, n1, K, k_per_split, n_split, n1, n1 // 8, n1, n1, pid - nt0,
                     pid_k, GROUP_SIZE, BLOCK_N, BLOCK_K, MODE, NUM_STAGES, HALF2)
        else:
            _m1_tile(x_ptr, qw2, qz2, sc2, out2, ws2, lk2, n2, K, k_per_split, n_split, n2, n2 // 8, n2, n2,
                     pid - nt0 - nt1, pid_k, GROUP_SIZE, BLOCK_N, BLOCK_K, MODE, NUM_STAGES, HALF2)

    def h2_consts_ptx(scale_exp: int = 0) -> str:
        """PTX that sets ``h2_unpack_ptx``'s constants for ``scale_exp`` (needs ``.reg .b32 c_lo, c_hi``): half2 of
        2**-e and 2**-(e + 4), the scales its subtracting HFMA2s put on the low nibbles' 1024 + code and the high
        ones' 1024 + 16 code (fp16 bits 0x3C00 - (e << 10), exact for 0 <= e <= 14)."""
        lo, hi = 0x3C00 - (scale_exp << 10), 0x3C00 - ((scale_exp + 4) << 10)
        return f"mov.b32 c_lo, 0x{lo:04X}{lo:04X};\n    mov.b32 c_hi, 0x{hi:04X}{hi:04X};\n    "

    @triton.jit
    def h2_zero_bits(zc, scale_exp: tl.constexpr):
        """(z1, z2): int32 fp16 bits of -(1024 + zc) * 2**-e and -(64 + zc) * 2**-e, the zero terms of
        ``h2_unpack_ptx`` for ``zc`` = zero + 1 in 1..16 (exact: ulp 2**-e / 2**-(e + 4) there)."""
        return zc + (0xE400 - (scale_exp << 10)), (zc << 4) + (0xD400 - (scale_exp << 10))

    def h2_unpack_ptx(word: str, z1: str, z2: str) -> str:
        """PTX that unpacks the int32 ``word`` into half2 registers t0..t3 = (code_j - zero, code_j+4 - zero) * 2**-e,
        j = 0..3, exactly (needs ``.reg .b32 t0, t1, t2, t3, q2`` and ``h2_consts_ptx(e)``'s c_lo, c_hi). One LOP3
        with ``0x64006400`` makes (1024 + code_j, 1024 + code_j+4); nibbles 1/5 and 3/7 are read in place at 16x
        and scaled back by the HFMA2 that subtracts: (1024 + 16c) * 2**-(e + 4) - (64 + zero) * 2**-e. ``z1`` /
        ``z2`` = half2 of ``h2_zero_bits``. Shared by this module's M = 1 word and ``w4a16_tcl``."""
        return f"""lop3.b32 t0, {word}, 0x000F000F, 0x64006400, 0xEA;
    lop3.b32 t1, {word}, 0x00F000F0, 0x64006400, 0xEA;
    shr.u32 q2, {word}, 8;
    lop3.b32 t2, q2, 0x000F000F, 0x64006400, 0xEA;
    lop3.b32 t3, q2, 0x00F000F0, 0x64006400, 0xEA;
    fma.rn.f16x2 t0, t0, c_lo, {z1};
    fma.rn.f16x2 t1, t1, c_hi, {z2};
    fma.rn.f16x2 t2, t2, c_lo, {z1};
    fma.rn.f16x2 t3, t3, c_hi, {z2};
    """  # lop3 0xEA = (a & b) | c

    def h2_dot_ptx(x0: str, x1: str, x2: str, x3: str, first: bool = True) -> str:
        """PTX that adds the 8 products of an unpacked word (``h2_unpack_ptx``'s t0..t3) against the half2 x pairs
        ``x0..x3`` to the half2 ``a`` (4 HFMA2; ``first`` starts ``a`` instead; needs ``.reg .b32 a``)."""
        head = f"mul.rn.f16x2 a, t0, {x0};" if first else f"fma.rn.f16x2 a, t0, {x0}, a;"
        return f"""{head}
    fma.rn.f16x2 a, t1, {x1}, a;
    fma.rn.f16x2 a, t2, {x2}, a;
    fma.rn.f16x2 a, t3, {x3}, a;
    """

    def h2_join_ptx(out: str) -> str:
        """PTX that joins the half2 ``a``'s two halves into the fp32 ``out`` (needs ``.reg .b16 lo, hi`` and
        ``.reg .f32 flo, fhi``)."""
        return f"""mov.b32 {{lo, hi}}, a;
    cvt.f32.f16 flo, lo;
    cvt.f32.f16 fhi, hi;
    add.f32 {out}, flo, fhi;
    """

    # One word of the half2 path: $1 = the word, $2..$5 = half2 (x'_j, x'_j+4) for j = 0..3, $6 / $7 = half2 of
    # -(1024 + zero) / -(64 + zero); $0 = fp32 sum of the word's 8 products (module docstring).
    _ASM_WORD_H2 = tl.constexpr("""{
    .reg .b32 t0, t1, t2, t3, q2, a, c_lo, c_hi;
    .reg .b16 lo, hi;
    .reg .f32 flo, fhi;
    """ + h2_consts_ptx() + h2_unpack_ptx("$1", "$6", "$7") + h2_dot_ptx("$2", "$3", "$4", "$5")
                                + h2_join_ptx("$0") + "}")
    H2_X_SCALE = tl.constexpr(X_SCALE)
    """2**-7: x' = x * 2**-7 keeps |x'| <= 512 for fp16 x, so four products (|code - zero| <= 16) sum to at most
    2**15 in magnitude."""

    @triton.jit
    def _fp16_opaque(v):
        """fp32 -> fp16 (round to nearest) in inline PTX, so the compiler cannot move it before the multiply that
        produced ``v``: LLVM rewrites ``fptrunc(x * 2**-7)`` as an fp16 multiply after the truncation, which turns
        bf16 x beyond 65504 into inf (seen on the H100: every output -inf for x = 65504 in bf16)."""
        return tl.inline_asm_elementwise("cvt.rn.f16.f32 $0, $1;", "=h,f", [v], dtype=tl.float16, is_pure=True,
                                         pack=1)

    @triton.jit
    def _half2_pair(a, b):
        """int32 holding fp16 ``a`` in the low and ``b`` in the high half (plain integer ops, so the compiler
        shares one pack among the columns that broadcast it)."""
        return (a.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (b.to(tl.int16, bitcast=True).to(tl.int32) << 16)

    @triton.jit
    def _half2_words(q, zc, x0, x1, x2, x3, x4, x5, x6, x7, BKW: tl.constexpr, BLOCK_N: tl.constexpr):
        """fp32 [BKW, BLOCK_N]: each word's sum of (code_j - zero) * x'_j over its 8 nibbles (``_ASM_WORD_H2``);
        ``zc`` [BLOCK_N] the zeros, ``x0..x7`` [BKW] fp16 x' of nibble j of every word row."""
        shp: tl.constexpr = (BKW, BLOCK_N)
        z1, z2 = h2_zero_bits(zc, 0)
        return tl.inline_asm_elementwise(
            _ASM_WORD_H2, "=f,r,r,r,r,r,r,r",
            [q, tl.broadcast_to(_half2_pair(x0, x4)[:, None], shp), tl.broadcast_to(_half2_pair(x1, x5)[:, None], shp),
             tl.broadcast_to(_half2_pair(x2, x6)[:, None], shp), tl.broadcast_to(_half2_pair(x3, x7)[:, None], shp),
             tl.broadcast_to((z1 | (z1 << 16))[None, :], shp), tl.broadcast_to((z2 | (z2 << 16))[None, :], shp)],
            dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _fp32_words(q, zc, x0, x1, x2, x3, x4, x5, x6, x7, BKW: tl.constexpr, BLOCK_N: tl.constexpr):
        """fp32 [BKW, BLOCK_N]: each word's sum of (code_j - zero) * x_j over its 8 nibbles (``_nibble_pair``);
        ``zc`` [BLOCK_N] = zero + 1, ``x0..x7`` [BKW] fp32 x of nibble j of every word row. The fp32 tile, and
        ``w4a16_tcl``'s M = 1 tile under the interpreter."""
        zf = zc.to(tl.float32)
        hi = q >> 16  # nibbles 4..7 at bits 0..15 (the sign bits above are masked off)
        t = tl.zeros((BKW, BLOCK_N), dtype=tl.float32)
        t = _nibble_pair(t, q, hi, x0, x4, zf, 0)
        t = _nibble_pair(t, q, hi, x1, x5, zf, 1)
        t = _nibble_pair(t, q, hi, x2, x6, zf, 2)
        return _nibble_pair(t, q, hi, x3, x7, zf, 3)

    @triton.jit
    def _m1_tile(x_ptr, qw_ptr, qz_ptr, sc_ptr, out_ptr, ws_ptr, lock_ptr, N, K, k_per_split, n_split, stride_qk,
                 stride_zg, stride_sg, stride_om, pid_n, pid_k, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, MODE: tl.constexpr, NUM_STAGES: tl.constexpr, HALF2: tl.constexpr):
        """One program of the M = 1 kernel: column tile ``pid_n``, K range ``pid_k``; ``HALF2``: the half2 PTX
        tile (``half2_path``), else the fp32 one."""
        BKW: tl.constexpr = BLOCK_K // 8
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_w = tl.arange(0, BKW)
        offs_j = tl.arange(0, 8)
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        zshift = (offs_n % 8) * 4
        acc = tl.zeros((BKW, BLOCK_N), dtype=tl.float32)
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):
            rows = k0 // 8 + offs_w
            mask_w = rows * 8 < k_hi
            q = tl.load(qw_ptr + rows[:, None] * stride_qk + offs_n[None, :], mask=mask_w[:, None] & mask_n[None, :],
                        other=0, eviction_policy="evict_first")  # streamed once: keep L2 for x and the scales
            g = k0 // GROUP_SIZE
            s = tl.load(sc_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            z = tl.load(qz_ptr + g * stride_zg + offs_n // 8, mask=mask_n, other=0)
            zc = ((z >> zshift) & 0xF) + 1
            # x[8w + j] for the 8 nibbles j of word row w: one contiguous [BKW, 8] load, split into 8 [BKW] columns
            xk = k0 + offs_w[:, None] * 8 + offs_j[None, :]
            xs = tl.load(x_ptr + xk, mask=xk < k_hi, other=0.0).to(tl.float32)
            if HALF2:
                xs = _fp16_opaque(xs * H2_X_SCALE)
            xs = xs.reshape(BKW, 2, 2, 2)
            xc0, xc1 = tl.split(xs)  # j = 4a + 2b + c; split peels c, then b, then a
            xb00, xb01 = tl.split(xc0)
            xb10, xb11 = tl.split(xc1)
            x0, x4 = tl.split(xb00)
            x2, x6 = tl.split(xb01)
            x1, x5 = tl.split(xb10)
            x3, x7 = tl.split(xb11)
            if HALF2:
                t = _half2_words(q, zc, x0, x1, x2, x3, x4, x5, x6, x7, BKW, BLOCK_N)
            else:
                t = _fp32_words(q, zc, x0, x1, x2, x3, x4, x5, x6, x7, BKW, BLOCK_N)
            acc += t * s[None, :]
        out = tl.sum(acc, axis=0)[None, :]
        if HALF2:
            out = out * (1.0 / H2_X_SCALE)
        _epilogue(out, out_ptr, ws_ptr, lock_ptr, tl.arange(0, 1), offs_n, 1, N, stride_om, pid_k, pid_n, n_split,
                  MODE)

    @triton.jit
    def _nibble_pair(t, lo, hi, x_lo, x_hi, zf, J: tl.constexpr):
        """``t + x_lo * (code_J - zero) + x_hi * (code_{J+4} - zero)`` for every word of a tile.

        Nibble J sits at bits 4J..4J+3 of ``lo`` (and nibble J+4 of the word in ``hi``). ORing in the exponent of
        ``2**(23 - 4J)`` without shifting makes the word read as fp32 ``2**(23 - 4J) + code`` exactly, so one
        and/or (LOP3) and one subtraction of ``2**(23 - 4J) + zero`` give the exact small integer ``code - zero``:
        no per-element shift and no int->float convert.
        """
        off = (zf + (2.0 ** (23 - 4 * J)))[None, :]
        expo = (150 - 4 * J) << 23  # biased exponent 127 + 23 - 4J
        c_lo = ((lo & (0xF << (4 * J))) | expo).to(tl.float32, bitcast=True) - off
        c_hi = ((hi & (0xF << (4 * J))) | expo).to(tl.float32, bitcast=True) - off
        t += c_lo * x_lo[:, None]  # two separate accumulations: each is one FFMA
        t += c_hi * x_hi[:, None]
        return t

    _FENCE = tl.constexpr(not kernels_interpreted())  # the interpreter runs programs one at a time

    @triton.jit
    def _after_own_writes(tile):
        """``tile``, once this thread's earlier global writes are performed GPU-wide (``fence.acq_rel.gpu``).

        One thread bumps a split-K semaphore after a barrier, but a barrier orders the other threads' writes only
        within the CTA: each writer fences its own partials / atomic adds first (CUDA's threadfence-reduction
        pattern), so the tile's last program cannot read one still in flight. Its cost on the H200 is below the
        noise between two device calls (0.01-0.12 us per M = 1 call; ``kernels_notes.md``, session 6).
        """
        if _FENCE:
            tile = tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.b32 $0, $1;", "=r,r", [tile],
                                             dtype=tl.int32, is_pure=False, pack=1)
        return tile

    @triton.jit
    def _epilogue(acc, out_ptr, ws_ptr, lock_ptr, offs_m, offs_n, M, N, stride_om, pid_k, tile, n_split,
                  MODE: tl.constexpr, CHUNK: tl.constexpr = 8):
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        if MODE == 0:
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=mask)
        elif MODE >= 3:
            tl.atomic_add(ws_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask, sem="relaxed")
        else:
            tl.store(ws_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=mask)
        if MODE == 2:
            tile = _after_own_writes(tile)
            tl.debug_barrier()  # every thread's partial is performed before the release below
            arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
            if arrived == n_split - 1:  # last program of this output tile: sum, cast, store, reset
                tot = tl.zeros_like(acc)
                for p0 in range(0, n_split, CHUNK):  # CHUNK partials per load round (no recompile per split)
                    offs_p = p0 + tl.arange(0, CHUNK)
                    p_ptrs = ws_ptr + ((offs_p[:, None, None] * M + offs_m[None, :, None]) * N + offs_n[None, None, :])
                    p_mask = (offs_p < n_split)[:, None, None] & mask[None, :, :]
                    tot += tl.sum(tl.load(p_ptrs, mask=p_mask, other=0.0, cache_modifier=".cg"), axis=0)
                tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], tot.to(out_ptr.dtype.element_ty),
                         mask=mask)
                tl.atomic_xchg(lock_ptr + tile, 0)
        if MODE == 4:
            tile = _after_own_writes(tile)
            tl.debug_barrier()  # every thread's atomic add is performed before the release below
            arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
            if arrived == n_split - 1:  # last program of this tile: cast the sum, store it, re-zero the row
                ws_tile = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
                tot = tl.load(ws_tile, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], tot.to(out_ptr.dtype.element_ty),
                         mask=mask)
                # the compiler may give the zeroing store another thread->element map than the load above: without
                # this barrier a thread can zero a sum another thread has not read yet (seen on the H200 with the
                # tensor-core lab kernel: 23 of 200 runs wrong, every buffer left clean)
                tl.debug_barrier()
                tl.store(ws_tile, tl.zeros_like(tot), mask=mask)
                tl.atomic_xchg(lock_ptr + tile, 0)

    @triton.jit
    def _cast_sums_kernel(ws_ptr, out0, out1, out2, M, n0, n1, n2, stride_o0, BLOCK: tl.constexpr,
                          PDL: tl.constexpr = 0):
        """The "atomic" mode's fp32 sums into 1-3 outputs, then the sums back to zero: ``ws`` holds output j's
        [M, n_j] sums after those of the outputs before it; output 0 has row stride ``stride_o0``, the others
        (a group's own buffers) their width."""
        pdl_enter(PDL)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        c1 = M * n0
        c2 = c1 + M * n1
        mask = offs < c2 + M * n2
        v = tl.load(ws_ptr + offs, mask=mask, other=0.0)
        tl.store(out0 + (offs // n0) * stride_o0 + offs % n0, v.to(out0.dtype.element_ty), mask=offs < c1)
        if n1 > 0:
            u1 = offs - c1
            tl.store(out1 + u1, v.to(out1.dtype.element_ty), mask=(offs >= c1) & (offs < c2))
        if n2 > 0:
            u2 = offs - c2
            tl.store(out2 + u2, v.to(out2.dtype.element_ty), mask=(offs >= c2) & mask)
        tl.store(ws_ptr + offs, tl.zeros_like(v), mask=mask)

    @triton.jit
    def take_sums(ptrs, mask, DTYPE: tl.constexpr):
        """A ``PendingSums`` taker's read: the fp32 sums at ``ptrs`` rounded to ``DTYPE`` as ``cast_sums`` rounds
        them, and zero stored back (after a barrier: the zeroing store may map threads to elements differently
        from the load, and no sum may be zeroed before its thread has read it)."""
        v = tl.load(ptrs, mask=mask, other=0.0)
        rounded = v.to(DTYPE)
        tl.debug_barrier()
        tl.store(ptrs, tl.zeros_like(v), mask=mask)
        return rounded

    @triton.jit
    def _splitk_reduce_kernel(ws_ptr, out_ptr, MN, N, stride_om, n_split, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for p in range(n_split):
            acc += tl.load(ws_ptr + p * MN + offs, mask=mask, other=0.0)
        tl.store(out_ptr + (offs // N) * stride_om + offs % N, acc.to(out_ptr.dtype.element_ty), mask=mask)


def half2_path(x: torch.Tensor) -> bool:
    """True when the M = 1 kernel runs its half2 PTX tile for ``x``: fp16/bf16 on CUDA, compiled (the Triton
    interpreter cannot run PTX; fp32 x keeps fp32 math)."""
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and not kernels_interpreted()


def m1_fit(cfg: GemvConfig, group_size: int) -> GemvConfig:
    """``cfg`` with ``block_k`` halved until it divides the kernel group size (``group_size % 8 == 0``): the
    M = 1 kernel reads one scale row per K step, so a table entry tuned on group 128 still serves group 32/64."""
    bk = cfg.block_k
    while group_size % bk and bk > 8:
        bk //= 2
    return cfg if bk == cfg.block_k else replace(cfg, block_k=bk)


def _split(k: int, cfg: GemvConfig) -> tuple[int, int]:
    """``(split, k_per_split)``: K steps shared out with no empty split."""
    k_tiles = -(-k // cfg.block_k)
    per = -(-k_tiles // max(1, min(cfg.split_k, k_tiles)))
    return -(-k_tiles // per), per * cfg.block_k


def check_kernel_inputs(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                        group_size: int, name: str) -> int:
    """The checks both W4A16 Triton kernels need; returns the kernel's group size (K when one group)."""
    check_w4(x, qweight, qzeros, scales, group_size)
    if not triton_usable(x):
        raise ValueError(f"{name} needs Triton on CUDA (or TRITON_INTERPRET=1); use w4a16_linear to fall back")
    if qweight.stride(1) != 1 or qzeros.stride(1) != 1 or scales.stride(1) != 1:
        raise ValueError("qweight, qzeros and scales must be contiguous along N (use prepare_w4)")
    gs = kernel_group_size(group_size, x.shape[1])
    if gs % 8:
        raise ValueError(f"the W4A16 kernels need group_size % 8 == 0 (or one group), got {group_size}")
    return gs


def w4a16_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    perm: torch.Tensor | None,
    group_size: int,
    config: GemvConfig | None = None,
    out: torch.Tensor | None = None,
    locks: torch.Tensor | None = None,
    acc: torch.Tensor | None = None,
    half2: bool | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W [K, N]`` for small M on monotone 4-bit tensors (``w4_layout``); [M, N] in x.dtype.

    ``perm``: act-order permutation of ``prepare_w4`` (or None). ``out`` (optional, [M, N] x.dtype, rows
    contiguous) is fully overwritten and returned. ``locks`` (zeroed int32, >= tiles entries) serves the
    "fixup" and "atomic_last" modes, ``acc`` (zeroed fp32, >= M * N entries) the two atomic modes; both are
    left zeroed (``PackedW4.locks`` / ``PackedW4.acc``); without them the stream's shared ones serve.
    ``half2``: the M = 1 kernel's tile, half2 or fp32 (default ``half2_path(x)``; True only where that holds).
    """
    if half2 and not half2_path(x):
        raise ValueError("the half2 tile needs fp16/bf16 x on a GPU with compiled Triton (half2_path)")
    gs = check_kernel_inputs(x, qweight, qzeros, scales, group_size, "w4a16_gemv")
    x = (x.index_select(1, perm) if perm is not None else x).contiguous()
    (m, k), n = x.shape, qweight.shape[1]
    cfg = config or default_gemv_config(m, n, k)
    out = check_out(out, x, m, n)
    if m == 0:
        return out
    if m == 1 and not cfg.use_dot:
        cfg = m1_fit(cfg, gs)
    split, k_per = _split(k, cfg)
    block_m = gemv_block_m(m, cfg.use_dot)
    grid = (triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, block_m))
    mode = 0 if split == 1 else _MODE_ID[cfg.mode]
    ws, locks = splitk_buffers(out, split, mode, locks, grid[0] * grid[2], acc)
    if m == 1 and not cfg.use_dot:
        _w4_gemv_m1_kernel[grid[:2]](
            x, qweight, qzeros, scales, out, ws, locks if mode in (2, 4) else ws, n, k, k_per, split, qweight.stride(0),
            qzeros.stride(0), scales.stride(0), out.stride(0), GROUP_SIZE=gs, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, MODE=mode, NUM_STAGES=cfg.num_stages, HALF2=half2_path(x) if half2 is None else half2,
            num_warps=cfg.num_warps,
        )
    else:
        _launch_general(x, qweight, qzeros, scales, out, ws, locks, grid, mode, split, k_per, gs, block_m, cfg)
    finish_splitk(ws, out, split, mode)
    return out


def share_input(x: torch.Tensor, packs: Sequence[PackedW4]) -> bool:
    """True when 2-3 weights can run as one launch over ``x`` [M, K]: same K, group size and act-order permutation
    tensor (or none; comparing contents would read the device back, which a CUDA-graph capture forbids, so equal
    copies of one permutation do not qualify), contiguous tensors. Host-side checks only."""
    if x.dim() != 2 or not 2 <= len(packs) <= 3:
        return False
    first = packs[0]
    return (x.shape[1] == first.in_features
            and all(p.in_features == first.in_features and p.group_size == first.group_size and p.perm is first.perm
                    for p in packs)
            and all(t.is_contiguous() for p in packs for t in (p.qweight, p.qzeros, p.scales)))


def m1_groupable(x: torch.Tensor, packs: Sequence[PackedW4], config: GemvConfig) -> bool:
    """True when ``w4a16_gemv_m1_group`` can serve ``x`` [1, K] with these weights in one launch: ``share_input``,
    one row, the fp32/half2 tile (not ``use_dot``) and a kernel group size that is a multiple of 8."""
    return (share_input(x, packs) and x.shape[0] == 1 and not config.use_dot
            and kernel_group_size(packs[0].group_size, packs[0].in_features) % 8 == 0)


def w4a16_gemv_m1_group(x: torch.Tensor, packs: Sequence[PackedW4], config: GemvConfig) -> list[torch.Tensor]:
    """``[x @ W_j for j]`` for x [1, K] and 2-3 weights that read it (q/k/v, gate/up): ONE launch of the M = 1
    kernel over every weight's column tiles (``m1_groupable`` must hold). Outputs [1, N_j] in x.dtype; each
    weight's ``locks`` / ``acc`` (``PackedW4``) are used and left zeroed as in ``w4a16_gemv``."""
    if not m1_groupable(x, packs, config):
        raise ValueError("w4a16_gemv_m1_group needs x [1, K] and 2-3 contiguous 4-bit weights with the same K, group "
                         f"size and permutation, groups a multiple of block_k={config.block_k}; use w4a16_gemv")
    for p in packs:
        check_kernel_inputs(x, p.qweight, p.qzeros, p.scales, p.group_size, "w4a16_gemv_m1_group")
    first = packs[0]
    x = (x.index_select(1, first.perm) if first.perm is not None else x).contiguous()
    k = x.shape[1]
    gs = kernel_group_size(first.group_size, k)
    config = m1_fit(config, gs)
    split, k_per = _split(k, config)
    mode = 0 if split == 1 else _MODE_ID[config.mode]
    outs = [torch.empty(1, p.out_features, device=x.device, dtype=x.dtype) for p in packs]
    tiles = [triton.cdiv(p.out_features, config.block_n) for p in packs]
    bufs, sums = group_buffers(outs, split, mode, 1, tiles)
    _w4_gemv_m1_group_kernel[(sum(tiles), split)](
        x, k, k_per, split, tiles[0], tiles[1], *group_args(packs, outs, bufs), GROUP_SIZE=gs,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, MODE=mode, NUM_STAGES=config.num_stages,
        HALF2=half2_path(x), num_warps=config.num_warps,
    )
    finish_group(bufs, sums, outs, split, mode)
    return outs


def group_buffers(outs: Sequence[torch.Tensor], split: int, mode: int, m_tiles: int,
                  tiles: Sequence[int]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
    """Per-weight (workspace, semaphores) of ONE grouped split-K launch writing ``outs`` (weight j: ``m_tiles`` x
    ``tiles[j]`` output tiles), and the sums region that ``finish_group`` casts (None outside the "atomic" mode).

    MODE 0 writes each ``out`` directly; the reduce (1) and the fixup (2) get each weight its own partials
    (``splitk_buffers``). The shared zeroed buffers (the fixup's and "atomic_last"'s semaphores, the atomic modes'
    sums) are consecutive slices of ONE ``splitk_scratch`` request, never the weights' own ``acc`` / ``locks``:
    a weight without them would otherwise get the stream's scratch from offset 0, the same slice as its
    siblings. The sums follow the outputs' order, as ``cast_sums`` reads them. Unused semaphore arguments get
    the workspace (the kernels read no semaphore there)."""
    if mode in (0, 1):
        return [(ws, ws) for ws, _ in (splitk_buffers(out, split, mode, None, 0) for out in outs)], None
    m, widths = outs[0].shape[0], [out.shape[1] for out in outs]
    sums, locks = splitk_scratch(outs[0].device, m * sum(widths) if mode != 2 else 0, m_tiles * sum(tiles))
    bufs, s0, l0 = [], 0, 0
    for out, n, t in zip(outs, widths, tiles):
        ws = splitk_buffers(out, split, 1, None, 0)[0] if mode == 2 else sums[s0:s0 + m * n]
        bufs.append((ws, locks[l0:l0 + m_tiles * t]))
        s0, l0 = s0 + m * n, l0 + m_tiles * t
    return bufs, sums if mode == 3 else None


def finish_group(bufs: Sequence[tuple[torch.Tensor, torch.Tensor]], sums: torch.Tensor | None,
                 outs: Sequence[torch.Tensor], split: int, mode: int) -> None:
    """After a grouped launch on ``group_buffers``: each weight's reduce, or one ``cast_sums`` for all of them."""
    if sums is not None:
        cast_sums(sums, outs)
    elif mode == 1:
        for (ws, _), out in zip(bufs, outs):
            finish_splitk(ws, out, split, mode)


def group_args(packs: Sequence[PackedW4], outs: Sequence[torch.Tensor],
               bufs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list:
    """The grouped kernels' per-weight arguments, flat: (qweight, qzeros, scales, out, sums, locks, N) for 3
    weights; a 2-weight group repeats weight 1 as weight 2 (the kernels give it no tiles)."""
    args: list = []
    for j in range(3):
        i = min(j, len(packs) - 1)
        args += [packs[i].qweight, packs[i].qzeros, packs[i].scales, outs[i], *bufs[i], packs[i].out_features]
    return args


def check_out(out: torch.Tensor | None, x: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """``out`` if it is a valid [m, n] result buffer for ``x`` (x.dtype, x.device, contiguous rows), else
    ValueError; a new buffer when None."""
    if out is None:
        return torch.empty(m, n, device=x.device, dtype=x.dtype)
    if out.shape != (m, n) or out.dtype != x.dtype or out.device != x.device or out.stride(1) != 1:
        raise ValueError(f"out must be [{m}, {n}] {x.dtype} on {x.device} (contiguous rows), got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")  # fmt: skip
    return out


_SCRATCH: dict[tuple[str, int | None, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
"""Per (device, stream): every zeroed (fp32 sums, int32 semaphores) pair ``splitk_scratch`` handed out, newest last."""


def splitk_scratch(device: torch.device, sums: int, n_locks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed fp32 ``[>= sums]`` and int32 ``[>= n_locks]`` buffers shared by this device and stream's one-launch
    split-K calls ("fixup", "atomic_last"), which leave them zeroed again.

    Calls on one stream run one after another, so they can share; another stream (a CUDA-graph capture) gets
    its own pair. A request for more allocates a larger pair; the old ones are kept alive, because graphs
    captured earlier read them.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    kept = _SCRATCH.setdefault((device.type, device.index, stream), [])
    if kept and kept[-1][0].numel() >= sums and kept[-1][1].numel() >= n_locks:
        return kept[-1]
    grow = (2 * kept[-1][0].numel(), 2 * kept[-1][1].numel()) if kept else (0, 0)
    pair = (torch.zeros(max(sums, grow[0], 1), device=device, dtype=torch.float32),
            torch.zeros(max(n_locks, grow[1], 1), device=device, dtype=torch.int32))
    kept.append(pair)
    return pair


def splitk_buffers(out: torch.Tensor, split: int, mode: int, locks: torch.Tensor | None, n_locks: int,
                   acc: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(workspace, locks) of a split-K launch in ``mode`` (the kernels' MODE ids): fp32 zeros [m, n] for the atomic
    modes (the caller's zeroed ``acc`` when it is fp32 with >= m * n entries, else the shared ``splitk_scratch``;
    both modes leave them zeroed), fp32 partials [split, m, n] for the reduce, ``out`` itself otherwise; zeroed locks
    (>= ``n_locks``) for the fixup and "atomic_last": the caller's, or the shared scratch's when they are missing
    or too short."""
    (m, n), dev = out.shape, out.device
    own_acc = mode in (3, 4) and acc is not None and acc.dtype == torch.float32 and acc.numel() >= m * n
    short = mode in (2, 4) and (locks is None or locks.numel() < n_locks)
    need_sums = mode in (3, 4) and not own_acc
    shared_sums, shared_locks = None, None
    if need_sums or short:  # one lookup of the stream's scratch for both
        shared_sums, shared_locks = splitk_scratch(dev, m * n if need_sums else 0, n_locks if short else 0)
    if mode in (3, 4):
        ws = acc if own_acc else shared_sums
    else:
        ws = torch.empty(split, m, n, device=dev, dtype=torch.float32) if mode else out
    return ws, shared_locks if short else locks


def atomic_mode(split: int) -> int:
    """The tensor-core launches' MODE for ``split`` K splits: 0 (one split: plain stores), else "atomic" (adds
    only; ``finish_splitk`` / ``finish_group`` cast them, or a ``PendingSums`` taker does)."""
    return 0 if split == 1 else _MODE_ID["atomic"]


def finish_splitk(ws: torch.Tensor, out: torch.Tensor, split: int, mode: int) -> None:
    """Sum the reduce mode's partials into ``out``, or cast the atomic mode's sums (``cast_sums``); nothing
    otherwise."""
    if mode == 1:
        m, n = out.shape
        _splitk_reduce_kernel[(triton.cdiv(m * n, 1024),)](ws, out, m * n, n, out.stride(0), split, BLOCK=1024)
    elif mode == 3:
        cast_sums(ws, [out])


@dataclass(frozen=True)
class PendingSums:
    """A split-K launch's result before its cast (``w4a16_tcl(..., defer_cast=True)``, "atomic" mode): one
    weight's fp32 sums [M, N] (a view of its own zeroed ``PackedW4.acc`` or of the stream's shared
    ``splitk_scratch``) and the dtype that ``cast_sums`` rounds them to.

    Whoever takes one owes the finish, once: one kernel that reads each sum, rounds it to ``dtype`` exactly as
    ``cast_sums`` does (``.to``: nearest even on CUDA) and stores zero back (``rms_norm`` with a residual,
    ``lora_expand``), or ``materialize``. The result then has the bits the cast launch would have given. Until
    the finish the sums are not zero, so no split-K launch may run on the stream in between (the model hands
    one to the next kernel that reads it: a norm, or the LoRA expand before it)."""

    sums: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.sums.shape

    @property
    def device(self) -> torch.device:
        return self.sums.device

    def materialize(self) -> torch.Tensor:
        """The [M, N] result in ``dtype`` (``cast_sums``: one launch, which also zeroes the sums)."""
        out = torch.empty(self.sums.shape, device=self.sums.device, dtype=self.dtype)
        cast_sums(self.sums, [out])
        return out


def cast_sums(ws: torch.Tensor, outs: Sequence[torch.Tensor], block: int = 512) -> None:
    """The "atomic" mode's finish: ``ws``'s fp32 sums into 1-3 [M, n_j] outputs (output j's after those of the
    outputs before it; all but the first contiguous), then ``ws`` back to zero; one launch."""
    m = outs[0].shape[0]
    widths = [o.shape[1] for o in outs] + [0] * (3 - len(outs))
    ptrs = list(outs) + [outs[0]] * (3 - len(outs))
    _cast_sums_kernel[(triton.cdiv(m * sum(widths), block),)](
        ws, *ptrs, m, *widths, outs[0].stride(0), BLOCK=block, num_warps=4, **pdl_options(outs[0]))


def _launch_general(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    out: torch.Tensor, ws: torch.Tensor, locks: torch.Tensor | None, grid: tuple[int, int, int],
                    mode: int, split: int, k_per: int, gs: int, block_m: int, cfg: GemvConfig) -> None:
    (m, k), n = x.shape, qweight.shape[1]
    _w4_gemv_kernel[grid](
        x, qweight, qzeros, scales, out, ws, locks if mode in (2, 4) else ws,
        m, n, k, k_per, split, x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), out.stride(0),
        GROUP_SIZE=gs, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        MODE=mode, USE_DOT=cfg.use_dot, DOT_F32=dot_f32(x),
        NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
    )
