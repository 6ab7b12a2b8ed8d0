"""W4A16 on the tensor-core layout (``PackedW4.layout == "tc"``), M = 1..``TCL_MAX_M``: Triton kernels + launchers.

Torch reference: ``gptq_dequant.gptq_linear`` on ``w4_layout.from_tc_layout(qweight)``; the layout (which input
row each nibble holds) is defined in ``w4_layout``. Served on CUDA, compiled (inline PTX). Under the Triton
interpreter (the CPU tests) the same kernels run with ``PTX`` off: plain shifts and masks instead of the PTX
unpack, so the layout and relabel logic is tested on every CI run. ``w4a16_gemm.w4a16_linear`` sends every other
case of a "tc" weight (CPU without the interpreter, fp32 x, M > ``TCL_MAX_M``) to ``w4_dequant.dequantize_w4`` +
matmul.

A program owns BLOCK_N output columns and a K range of whole 128-row steps (grid: row tiles, column tiles,
split-K); a step reads 16 contiguous words per column (one quantization group: the group size is a multiple of
128). Two tiles over the same words:

- the tensor-core step (2 <= M <= ``TCL_MAX_M``, ``_tcl_tile``): operands swapped (out^T = W^T x^T, M is
  wgmma's N: 16..128 rows per tile). The ``[BLOCK_N, 16]`` word tile is unpacked by ``_unpack_words`` (fp16:
  four LOP3, one shift and four HSUB2/HFMA2 per word, exact ``code - zero``; bf16: ``w4a16_tc._unpack8``) and
  relabelled with ``join`` / ``permute`` / ``reshape`` only into wgmma's register operand A. In this layout a
  thread's 4 consecutive words hold exactly the (k, k + 1) pairs of its lane in the A fragment, so the relabel
  stays in registers: no shared-memory relayout (STS + LDSM in the GPTQ-layout kernel, ``w4a16_tc``) and no
  pair shuffles (PRMT). ``python benchmarks/sass_count.py tcl`` counts 3.20 / 3.50 / 4.05 SASS instructions
  per weight element in the loop of the 16- / 32- / 64-row defaults (64 columns; the rows add the once-per-step
  scaling of the fp32 accumulator, 8 / 16 / 32 FFMA, and the x tile's masks and copies, 12 / 23 / 39 ISETP,
  SEL and LDGSTS), against 4.91 for ``w4a16_tc``'s swapped step at 32 x 64. Up to ``TC_PRELOAD_MAX_M`` rows
  the first step is peeled and its weights load before the PDL wait (``PRELOAD``, as the M = 1 GEMV's).
  The load puts 8 rows per warp, wgmma wants 16, so row bit 3 moves into the registers and the warp bits up
  by one (``_rows_to_mma``); the epilogue undoes it so its stores and split-K atomics stay contiguous (F32x4
  atomics).
- the M = 1 GEMV (``_m1_tcl_tile``): the half2 word of ``w4a16_gemv`` (HFMA2 over a word's (j, j + 4) nibble
  pairs; here each pair is the consecutive input pair (k, k + 1)), four words at a time: a thread's 4
  consecutive words of a column (one 128-bit load, c = 4t + v) sum their 32 products in one half2 register and
  join it into fp32 once (``_m1_quad``: one join and one scale FFMA per 4 words, not 4). Every product and
  partial sum is in 2**-9 units, so 16 products of |x| <= 65504 stay inside fp16 (|code - zero| <= 16); the
  scale sits on the weights, exactly, in the HFMA2 that subtracts the zero (``h2_zero_bits``). x comes as half2
  pairs three ways (``XPAIRS``): fp16 x as loaded (1: one 32-bit load per pair in the words' own layout,
  2**-9 on the weights); bf16 x's fp16 copy x' = x * 2**-7 that the RMSNorm before q/k/v and gate/up writes
  (2: ``x_half``, ``half_pairs_ok``, 2**-2 on the weights); otherwise (0: bf16 o_proj input, the SwiGLU
  product, unaligned x) gathered, scaled by 2**-7 and rounded in the step, a pair per ``cvt`` (``_f16x2``:
  bf16 gathered launches 12.48 / 12.00 -> 11.73 / 11.84 us on the 11008 shapes, ``tcl_cvt_bf16_*``). 1 and 0
  make the same products;
  2 gives 0's bits. A half2 sum is four times longer than a word's, so its fp16 rounding grows: max error
  against the fp32 reference over max|y|, fp16, 3.7-6.1e-4 -> 6.7-6.9e-4 (the fp16 output's own rounding is
  up to 4.9e-4); bf16 3.0-3.2e-3 either way, its output rounding (``tcl_q4b_*``).
  Offline SASS on the device's Triton 3.6 (``python benchmarks/sass_count.py tcl1 --block-n 128 --stages 1
  [--xpairs | --xhalf --bf16 | --bf16 | --silu]``, instructions a step against a word at a time): fp16 pairs
  385 -> 329, the norm's copy 331, the gathered bf16 step 497 -> 449 (417 with one ``cvt`` a pair), SwiGLU
  521 -> 472 (440). H100, graph-timed against HEAD in one call
  (``tcl_q4b_{fp16,bf16}_{new,old}_1_h100``), us: fp16 4096x4096 6.40 -> 6.41, the 11008 shapes 11.62 ->
  10.87; bf16 (gathered) 6.93 -> 6.90, 12.77 / 13.11 -> 12.10 / 12.01. End to end with the norm's copy:
  ``docs/kernels.md``, "Session 22".

Split-K: the programs add their fp32 partial sums atomically into zeroed sums (``w4a16_gemv`` MODE 3,
"atomic": no semaphore) and a second launch, ``w4a16_gemv.cast_sums``, casts them into the outputs (all 2-3 of a
group in one launch) and re-zeroes them: no host sync, fixed shapes, CUDA-graph safe; the sums are ``packed.acc``
or the stream's shared ``splitk_scratch``. The one-launch alternative, "atomic_last" (MODE 4: each tile's last
program casts, stores and re-zeroes), puts a GPU-scope fence, a semaphore round trip and a reload in the tail of
every tile; the second launch won wherever it was measured against it (H100, 7B W4, end to end: batch 1
+3.9-4.8%, with 32 adapters +12.1%, batch 2 / 4 / 8 +12% / +9% / +8%, batch 16 +3%, batch 32 with 32 adapters
+1.9%, ``python benchmarks/ab_table.py benchmarks/results/e2e_castall_ _h100``; kernels alone at M = 48..256
where K is split 1.05-1.31x, ``tcl_castany_*_h100.md``, and end to end batch 48-128 +2-7%, ``e2e_castany_``).

LoRA shrink beside the weights: every launcher takes a ``LoRAShrink`` of the same x and, where it fits
(``SHRINK_MAX_ROWS``, x not permuted for act-order), runs it as extra column tiles of its grid (``SHRINK``:
``lora_sgmv_triton.shrink_split`` programs, independent of the weight tiles) and sets ``shrink.partials``; a
caller that finds them None runs ``lora_shrink_partials`` itself.

SwiGLU inside the down projection: at M = 1 ``w4a16_tcl`` takes ``SwiGLU`` (x = the gate) and its programs read
``silu(x) * up`` (``SILU``: ``silu_mul.silu_times`` on each step's 128 inputs, the same bits as ``silu_mul``), so
the decode step has no ``silu_mul`` launch; column tile 0 stores the product where the LoRA hook may read it.

Measured on the H100 (``benchmarks/results/tcl_h100.md``: fp16 cuBLAS and the GPTQ-layout kernels in the same
run; ``docs/kernels.md``, "Session 11").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._triton import HAS_TRITON, kernels_interpreted, pdl_options, tl, triton, triton_usable
from .w4_layout import TC_STEP, PackedW4, kernel_group_size
from .w4a16_gemv import (
    _MODE_ID,
    PendingSums,
    _pow2,
    atomic_mode,
    check_out,
    finish_group,
    finish_splitk,
    group_args,
    group_buffers,
    share_input,
    splitk_buffers,
)
from .lora_sgmv_triton import SHRINK_BLOCK_K, SHRINK_CHUNK_R, LoRAShrink
from .silu_mul import SwiGLU
from .w4a16_small_m import _num_sms
from .w4a16_tc import _MAGIC, tc_split

__all__ = ["SHRINK_MAX_ROWS", "TCL_MAX_M", "TclConfig", "tcl_config", "tcl_group_config", "tcl_m1_config",
           "tcl_usable", "w4a16_tcl", "w4a16_tcl_group"]

SHRINK_MAX_ROWS = 256
"""Most A rows (an adapter stack's rank, summed over a group) whose LoRA shrink runs inside the W4 launch; above
``lora_sgmv_triton.SHRINK_CHUNK_R`` rows its programs take them in rounds of 64 (``shrink_split`` ``ROUNDS``: in one
tile, a rank-64 group's 192 rows slowed the GEMV programs of the same launch, 62.8 -> 71.8 us for the two M = 1
groups of a 7B layer in a lab). H100, one 7B layer, the shrinks inside against separate launches
(``benchmarks/results/lora_decode_*_h100.md``, ``docs/kernels.md``, "Session 12"): rank 16 89.5 -> 77.8 us at
batch 1, 130.6 -> 118.2 at batch 32; rank 64, rounds, same call as the 64-row cap: 98.3 -> 90.8 at batch 1,
214.6 -> 205.2 at batch 32."""

TCL_MAX_M = 256
"""Largest M ``w4a16_linear`` sends here: at 256 rows the tensor-core step is 1.39-1.53x faster than dequantize +
cuBLAS on the Llama-2-7B shapes (H100, ``benchmarks/results/tcl_m256_h100.md``); larger M dequantizes first."""

TC_PRELOAD_MAX_M = 8
"""Largest M whose tensor-core programs load their first step's weights before waiting for the kernel before
(``_tcl_tile`` ``PRELOAD``). H100, 7B W4 end to end, graphed, against the loop that waits first, two runs each
(``python benchmarks/ab_table.py benchmarks/results/e2e_tcpre_ _h100``, PDL mode 1): batch 2 / 4 / 8 +2.1% /
+2.3% / +2.0%, but batch 16 -1.7% (not explained), so from M = 9 the programs wait first. Under PDL mode 2 the
preload gives +5.8% / +4.1% / +4.7% / +3.1% at batch 2 / 4 / 8 / 16, yet mode 2 still loses to mode 1 at
batches 2-4 and 16 (``_triton.PDL_EARLY_MAX_BATCH``)."""

if HAS_TRITON:
    from .w4a16_gemv import (
        H2_X_SCALE,
        _epilogue,
        _fp32_words,
        h2_consts_ptx,
        h2_dot_ptx,
        h2_join_ptx,
        h2_unpack_ptx,
        h2_zero_bits,
    )
    from .lora_sgmv_triton import shrink_split
    from ._triton import pdl_enter
    from .silu_mul import silu_times
    from .w4a16_tc import _unpack8

    STEP = tl.constexpr(TC_STEP)

    # fp16 unpack of one word in 9 PTX instructions (``w4a16_tc._unpack8`` takes 11: ``h2_unpack_ptx``).
    # $8 = the word, $9 / $10 = half2 of -(1024 + z) / -(64 + z); outputs as _unpack8's: $j = code_j - zero for
    # nibble j (the low half of register j % 4 holds j < 4, the high half j + 4)
    _ASM9_F16 = tl.constexpr("""{
    .reg .b32 t0, t1, t2, t3, q2, c_lo, c_hi;
    """ + h2_consts_ptx() + h2_unpack_ptx("$8", "$9", "$10") + """mov.b32 {$0, $4}, t0;
    mov.b32 {$1, $5}, t1;
    mov.b32 {$2, $6}, t2;
    mov.b32 {$3, $7}, t3;
    }""")

    @triton.jit
    def _unpack_words(q, zc, BF16: tl.constexpr, MAGIC: tl.constexpr, PTX: tl.constexpr):
        """8 tensors ``code_j - zero`` (j = nibble) of the int32 words ``q``; ``zc`` = zero + 1 (the GPTQ +1),
        broadcastable to q. fp16: ``_ASM9_F16``; bf16: ``w4a16_tc._unpack8``; without ``PTX`` (the Triton
        interpreter, which runs no inline assembly) plain shifts and masks, the same exact values in fp32."""
        if not PTX:  # fp32 (exact): the interpreter's bf16 conversions and dot are wrong (docs/kernels.md, "Tests")
            f = tl.float32
            return (((q & 0xF) - zc).to(f), (((q >> 4) & 0xF) - zc).to(f), (((q >> 8) & 0xF) - zc).to(f),
                    (((q >> 12) & 0xF) - zc).to(f), (((q >> 16) & 0xF) - zc).to(f), (((q >> 20) & 0xF) - zc).to(f),
                    (((q >> 24) & 0xF) - zc).to(f), (((q >> 28) & 0xF) - zc).to(f))
        if BF16:
            zh = zc + MAGIC  # the 16-bit pattern of MAGIC + zero (exact)
            return _unpack8(q, tl.broadcast_to(zh | (zh << 16), q.shape), True)
        else:
            z1, z2 = h2_zero_bits(zc, 0)
            return tl.inline_asm_elementwise(_ASM9_F16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r",
                                             [q, tl.broadcast_to(z1 | (z1 << 16), q.shape),
                                              tl.broadcast_to(z2 | (z2 << 16), q.shape)],
                                             dtype=(tl.float16,) * 8, is_pure=True, pack=1)

    @triton.jit
    def _rows_to_mma(v, BLOCK_N: tl.constexpr, WARPS: tl.constexpr, TAIL: tl.constexpr):
        """Rows of ``v`` [BLOCK_N, TAIL] relabelled (hi, b, warp bits, lo3) -> (hi, warp bits, b, lo3): the load's
        warps own 8 consecutive rows, wgmma's 16 (row bit 3 in registers)."""
        r = tl.reshape(v, (BLOCK_N // (16 * WARPS), 2, WARPS, 8, TAIL))
        return tl.reshape(tl.permute(r, (0, 2, 1, 3, 4)), (BLOCK_N, TAIL))

    @triton.jit
    def _rows_from_mma(v, BLOCK_N: tl.constexpr, WARPS: tl.constexpr, TAIL: tl.constexpr):
        """Inverse of ``_rows_to_mma``."""
        r = tl.reshape(v, (BLOCK_N // (16 * WARPS), WARPS, 2, 8, TAIL))
        return tl.reshape(tl.permute(r, (0, 2, 1, 3, 4)), (BLOCK_N, TAIL))

    @triton.jit
    def _tc_words(qw_ptr, qz_ptr, sc_ptr, k0, N, offs_n, offs_na, mask_n, stride_zg, stride_sg,
                  GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr):
        """The tensor-core step's weight loads at input row ``k0`` for tiles of ``BLOCK_M`` rows: words
        [BLOCK_N, 16], scales (in MMA row order) and zeros."""
        step = k0 // 128  # STEP (the interpreter cannot do arithmetic with a global constexpr)
        q = tl.load(qw_ptr + (step * N + offs_n)[:, None] * 16 + tl.arange(0, 16)[None, :],
                    mask=mask_n[:, None], other=0, eviction_policy="evict_first")
        g = k0 // GROUP_SIZE
        if BLOCK_M <= 32:
            # each column's scale read as the half of its 4-byte pair: a 2-byte load cannot go through cp.async, so
            # the loop's pipeliner left it in the step, whose HGMMA alone then covered its latency (ncu, session 24:
            # 31% of the q/k/v launch's stall samples at M = 16 waited on it); the pair load is issued stages ahead
            # like the zeros (N is even and the scales 4-byte aligned: tcl_usable). Not with 64-row tiles and up,
            # where the grouped launch got slower (q/k/v at M = 64: 23.3 -> 34.6 us; tcl_group_sp_*_h100)
            sw = tl.load(sc_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + (g * stride_sg + offs_na) // 2,
                         mask=offs_na < N, other=0)
            s = ((sw >> ((offs_na % 2) * 16)) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        else:
            s = tl.load(sc_ptr + g * stride_sg + offs_na, mask=offs_na < N, other=0.0).to(tl.float32)
        z = tl.load(qz_ptr + g * stride_zg + offs_n // 8, mask=mask_n, other=0)
        return q, s, z

    @triton.jit
    def _tc_step(acc, q, s, z, x_ptr, k0, zshift, offs_m, mask_m, stride_xm, BLOCK_N: tl.constexpr,
                 WARPS: tl.constexpr, BF16: tl.constexpr, MAGIC: tl.constexpr, PTX: tl.constexpr):
        """``acc`` [BLOCK_N, BLOCK_M] plus one tensor-core step from its weight loads (``_tc_words``); ``zshift``
        = each column's bit offset in its zeros word."""
        d0, d1, d2, d3, d4, d5, d6, d7 = _unpack_words(q, (((z >> zshift) & 0xF) + 1)[:, None], BF16, MAGIC, PTX)
        # e[n, c, j2, j1, j0] = nibble 4 j2 + 2 j1 + j0 of word c = 4t + v; as [n, v, j1, j0, t, j2] its K index
        # is 32v + 16j1 + 8j0 + 2t + j2, the input row w4_layout stores there
        e = tl.join(tl.join(tl.join(d0, d4), tl.join(d2, d6)), tl.join(tl.join(d1, d5), tl.join(d3, d7)))
        w = tl.reshape(tl.permute(tl.reshape(e, (BLOCK_N, 4, 4, 2, 2, 2)), (0, 2, 4, 5, 1, 3)), (BLOCK_N, STEP))
        w = _rows_to_mma(w, BLOCK_N, WARPS, STEP)
        xk = k0 + tl.arange(0, STEP)  # K and the split are whole steps: no K mask
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + xk[:, None], mask=mask_m[None, :], other=0.0)
        if PTX:
            return acc + tl.dot(w, xt) * s
        else:  # the interpreter: fp32 operands (w is fp32 there)
            return acc + tl.dot(w, xt.to(tl.float32)) * s

    @triton.jit
    def _tcl_tile(x_ptr, qw_ptr, qz_ptr, sc_ptr, out_ptr, ws_ptr, lock_ptr, M, N, K, k_per_split, n_split,
                  stride_xm, stride_zg, stride_sg, stride_om, pid_m, pid_n, pid_k, m_tiles,
                  GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr,
                  NUM_STAGES: tl.constexpr, WARPS: tl.constexpr, BF16: tl.constexpr, MAGIC: tl.constexpr,
                  PTX: tl.constexpr, PRELOAD: tl.constexpr = False, PDL: tl.constexpr = 0):
        """One program of the tensor-core step: rows ``pid_m`` (of ``m_tiles``), columns ``pid_n``, K range
        ``pid_k`` (module docstring). With ``PRELOAD`` the first step is peeled and its weight loads go out before
        ``pdl_enter(PDL)`` (as ``_m1_tcl_tile``'s); without it the caller has waited already."""
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_na = _rows_to_mma(offs_n[:, None], BLOCK_N, WARPS, 1)  # [BLOCK_N, 1]: the column of each MMA row
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        k_lo = pid_k * k_per_split
        if PTX:  # a hint for the compiler's vectorization (the interpreter has no use for it)
            k_lo = tl.multiple_of(k_lo, STEP)
        k_hi = tl.minimum(k_lo + k_per_split, K)  # > k_lo: tc_split leaves no split empty
        zshift = (offs_n % 8) * 4
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        k_first = k_lo
        if PRELOAD:
            q, s, z = _tc_words(qw_ptr, qz_ptr, sc_ptr, k_lo, N, offs_n, offs_na, mask_n, stride_zg, stride_sg,
                                GROUP_SIZE, BLOCK_M)
            pdl_enter(PDL)
            acc = _tc_step(acc, q, s, z, x_ptr, k_lo, zshift, offs_m, mask_m, stride_xm, BLOCK_N, WARPS, BF16, MAGIC,
                           PTX)
            k_first = k_lo + 128
        for k0 in tl.range(k_first, k_hi, STEP, num_stages=NUM_STAGES):
            q, s, z = _tc_words(qw_ptr, qz_ptr, sc_ptr, k0, N, offs_n, offs_na, mask_n, stride_zg, stride_sg,
                                GROUP_SIZE, BLOCK_M)
            acc = _tc_step(acc, q, s, z, x_ptr, k0, zshift, offs_m, mask_m, stride_xm, BLOCK_N, WARPS, BF16, MAGIC,
                           PTX)
        acc = tl.trans(_rows_from_mma(acc, BLOCK_N, WARPS, BLOCK_M))
        _epilogue(acc, out_ptr, ws_ptr, lock_ptr, offs_m, offs_n, M, N, stride_om, pid_k, pid_n * m_tiles + pid_m,
                  n_split, MODE)

    @triton.jit
    def _m1_words(qw_ptr, qz_ptr, sc_ptr, k0, N, offs_n, mask_n, stride_zg, stride_sg, GROUP_SIZE: tl.constexpr):
        """The M = 1 GEMV's weight loads for the step at input row ``k0``: words [16, BLOCK_N] (a column's 16 words
        contiguous: a thread loads 4 consecutive ones, c = 4t + v for v = 0..3, in one 128-bit load), scales,
        zeros."""
        step = k0 // 128  # STEP (the interpreter cannot do arithmetic with a global constexpr)
        q = tl.load(qw_ptr + (step * N + offs_n)[None, :] * 16 + tl.arange(0, 16)[:, None],
                    mask=mask_n[None, :], other=0, eviction_policy="evict_first")
        g = k0 // GROUP_SIZE
        s = tl.load(sc_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(qz_ptr + g * stride_zg + offs_n // 8, mask=mask_n, other=0)
        return q, s, z

    def _quad_asm(scale_exp: int) -> str:
        """PTX of ``_m1_quad``: the four words' 32 products (code - zero) * 2**-e * x' summed in one half2 register,
        then joined into fp32 once (where a word at a time joins four times)."""
        words = "".join(h2_unpack_ptx(f"${1 + v}", "$21", "$22")
                        + h2_dot_ptx(*(f"${5 + 4 * v + j}" for j in range(4)), first=v == 0) for v in range(4))
        return ("""{
    .reg .b32 t0, t1, t2, t3, q2, a, c_lo, c_hi;
    .reg .b16 lo, hi;
    .reg .f32 flo, fhi;
    """ + h2_consts_ptx(scale_exp) + words + h2_join_ptx("$0") + "}")

    QUAD_X_EXP = tl.constexpr(9)
    """fp16 x as loaded (``XPAIRS``): 2**-9 on the weights keeps 16 products (|code - zero| <= 16) of |x| <= 65504
    inside fp16 (|sum| <= 2**15)."""
    QUAD_XS_EXP = tl.constexpr(QUAD_X_EXP.value - 7)
    """The gathered x' = x * 2**-7 (``H2_X_SCALE``): 2**-2 on the weights, the same 2**-9 in all."""
    _ASM_QUAD_X = tl.constexpr(_quad_asm(QUAD_X_EXP.value))
    _ASM_QUAD_XS = tl.constexpr(_quad_asm(QUAD_XS_EXP.value))

    @triton.jit
    def _m1_quad(asm: tl.constexpr, q0, q1, q2, q3, p00, p01, p02, p03, p10, p11, p12, p13, p20, p21, p22, p23,
                 p30, p31, p32, p33, z1, z2, BLOCK_N: tl.constexpr):
        """fp32 [4, BLOCK_N]: for each t and column, the sum of the 32 products of words 4t + v, v = 0..3 (``q0..q3``
        [4, BLOCK_N]), against the half2 x pairs ``p<v><j>`` [4] of their nibbles (j, j + 4), in 2**-9 units
        (``asm``: ``_ASM_QUAD_X`` or ``_ASM_QUAD_XS``); ``z1`` / ``z2`` [BLOCK_N] from ``h2_zero_bits``."""
        shp: tl.constexpr = (4, BLOCK_N)
        return tl.inline_asm_elementwise(
            asm, "=f" + ",r" * 22,
            [q0, q1, q2, q3,
             tl.broadcast_to(p00[:, None], shp), tl.broadcast_to(p01[:, None], shp),
             tl.broadcast_to(p02[:, None], shp), tl.broadcast_to(p03[:, None], shp),
             tl.broadcast_to(p10[:, None], shp), tl.broadcast_to(p11[:, None], shp),
             tl.broadcast_to(p12[:, None], shp), tl.broadcast_to(p13[:, None], shp),
             tl.broadcast_to(p20[:, None], shp), tl.broadcast_to(p21[:, None], shp),
             tl.broadcast_to(p22[:, None], shp), tl.broadcast_to(p23[:, None], shp),
             tl.broadcast_to(p30[:, None], shp), tl.broadcast_to(p31[:, None], shp),
             tl.broadcast_to(p32[:, None], shp), tl.broadcast_to(p33[:, None], shp),
             tl.broadcast_to((z1 | (z1 << 16))[None, :], shp), tl.broadcast_to((z2 | (z2 << 16))[None, :], shp)],
            dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _split4(a, A: tl.constexpr, B: tl.constexpr):
        """[A, B, 4] -> its four [A, B] slices along the last axis (index 0..3): reshape and split only, so a
        thread that holds the 4 keeps them in registers."""
        e, o = tl.split(tl.reshape(a, (A, B, 2, 2)))  # index 2 i1 + i0: split i0, then i1
        a0, a2 = tl.split(e)
        a1, a3 = tl.split(o)
        return a0, a1, a2, a3

    @triton.jit
    def _x_pairs(x32, v: tl.constexpr):
        """fp16 x read as pairs (``XPAIRS``): the int32 (x_j, x_j+4) of word 4t + v's nibbles j = 0..3, [4] over t.
        Word c = 4t + v needs inputs (k, k + 1), k = k0 + 32v + 16j1 + 8j0 + 2t (module docstring): int32 element
        k0 / 2 + 16v + t + 4j (``x32`` = x as int32 + k0 / 2 + t). One 32-bit load each, in the words' own
        layout (from L1: every column tile reads the same 256 bytes): no gather, exchange or rounding pass."""
        return (tl.load(x32 + 16 * v), tl.load(x32 + 16 * v + 4), tl.load(x32 + 16 * v + 8),
                tl.load(x32 + 16 * v + 12))

    @triton.jit
    def _x_block(x_ptr, k0, PTX: tl.constexpr, u_ptr, h_ptr, pid_n, SILU: tl.constexpr, STORE_H: tl.constexpr):
        """Gathered x (``silu(x) * u`` with ``SILU``) of a step, [4 (t), 4 (v), 4 (j), 2 (i)]: x[k0 + 2t + 32v + 8j
        + i], nibble j (i = 0) or j + 4 (i = 1) of word 4t + v (the layout's pairs); ``STORE_H``: column tile 0
        stores the product at ``h_ptr`` (scalar-bool masks fail in the interpreter)."""
        idx = (2 * tl.arange(0, 4)[:, None, None, None] + 32 * tl.arange(0, 4)[None, :, None, None]
               + 8 * tl.arange(0, 4)[None, None, :, None] + tl.arange(0, 2)[None, None, None, :])
        xs = tl.load(x_ptr + k0 + idx)
        if SILU:
            xs = silu_times(xs, tl.load(u_ptr + k0 + idx), PTX)
            if STORE_H:
                tl.store(h_ptr + k0 + idx, xs, mask=idx < tl.where(pid_n == 0, 128, 0))
        return xs

    @triton.jit
    def _f16x2(lo, hi):
        """int32 half2 of fp32 ``lo`` (low half) and ``hi``, each rounded to nearest (one ``cvt.rn.f16x2.f32``; the
        bits of ``_fp16_opaque`` twice and a pack, and as opaque to LLVM's fptrunc folding)."""
        return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi], dtype=tl.int32,
                                         is_pure=True, pack=1)

    @triton.jit
    def _v_slices(a):
        """[4 (t), 4 (v), 4 (j)] -> the four [4 (t), 4 (j)] slices v = 0..3."""
        return _split4(tl.permute(a, (0, 2, 1)), 4, 4)

    @triton.jit
    def _j_slices(a):
        """[4 (t), 4 (j)] -> the four [4 (t)] columns j = 0..3."""
        e, o = tl.split(tl.reshape(a, (4, 2, 2)))
        a0, a2 = tl.split(e)
        a1, a3 = tl.split(o)
        return a0, a1, a2, a3

    @triton.jit
    def _fp32_quad(q, zc, lo, hi, BLOCK_N: tl.constexpr):
        """fp32 [4, BLOCK_N]: one word's share of ``_m1_quad`` in fp32 from shifts and masks (the interpreter); ``q``
        [4, BLOCK_N] the words, ``lo`` / ``hi`` [4 (t), 4 (j)] x of their nibbles j / j + 4."""
        x0, x1, x2, x3 = _j_slices(lo)
        x4, x5, x6, x7 = _j_slices(hi)
        return _fp32_words(q, zc, x0, x1, x2, x3, x4, x5, x6, x7, 4, BLOCK_N)

    @triton.jit
    def _m1_step(acc, q, s, z, x_ptr, k0, offs_n, BLOCK_N: tl.constexpr, PTX: tl.constexpr, u_ptr, h_ptr, pid_n,
                 SILU: tl.constexpr, STORE_H: tl.constexpr, XPAIRS: tl.constexpr = 0):
        """``acc`` [4, BLOCK_N] plus one step of the M = 1 GEMV from its weight loads (``_m1_words``), in 2**-9
        units: each thread sums its 4 words of a column in one half2 register (``_m1_quad``), then one FFMA
        scales and adds. ``XPAIRS`` (not with ``SILU``, whose input this step computes): 1 = fp16 x read as pairs
        (``_x_pairs``, 2**-9 on the weights), 2 = x at ``x_ptr`` is already x' = x * 2**-7 in fp16 (``x_half``:
        read as pairs, 2**-2 on the weights; the gathering step's bits); 0 = x is gathered, scaled by 2**-7 and
        rounded here."""
        tl.static_assert(not (XPAIRS and SILU), "XPAIRS reads x as loaded: no SILU input")
        zc = ((z >> ((offs_n % 8) * 4)) & 0xF) + 1
        # [4 (t), BLOCK_N] each: word 4t + v (the load's 4 consecutive words of a thread, relabelled in registers)
        q0, q1, q2, q3 = _split4(tl.permute(tl.reshape(q, (4, 4, BLOCK_N)), (0, 2, 1)), 4, BLOCK_N)
        if PTX:
            if XPAIRS:
                x32 = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + (k0 // 2 + tl.arange(0, 4))
                p00, p01, p02, p03 = _x_pairs(x32, 0)
                p10, p11, p12, p13 = _x_pairs(x32, 1)
                p20, p21, p22, p23 = _x_pairs(x32, 2)
                p30, p31, p32, p33 = _x_pairs(x32, 3)
            else:  # x' = x * 2**-7 in fp32, rounded to an fp16 pair by one cvt (``_f16x2``)
                lo, hi = tl.split(_x_block(x_ptr, k0, True, u_ptr, h_ptr, pid_n, SILU, STORE_H).to(tl.float32)
                                  * H2_X_SCALE)
                w0, w1, w2, w3 = _v_slices(_f16x2(lo, hi))
                p00, p01, p02, p03 = _j_slices(w0)
                p10, p11, p12, p13 = _j_slices(w1)
                p20, p21, p22, p23 = _j_slices(w2)
                p30, p31, p32, p33 = _j_slices(w3)
            z1, z2 = h2_zero_bits(zc, QUAD_X_EXP if XPAIRS == 1 else QUAD_XS_EXP)
            t = _m1_quad(_ASM_QUAD_X if XPAIRS == 1 else _ASM_QUAD_XS, q0, q1, q2, q3, p00, p01, p02, p03, p10, p11,
                         p12, p13, p20, p21, p22, p23, p30, p31, p32, p33, z1, z2, BLOCK_N)
        else:  # the interpreter: fp32 x, word by word (``_fp32_words``)
            lo, hi = tl.split(_x_block(x_ptr, k0, False, u_ptr, h_ptr, pid_n, SILU, STORE_H).to(tl.float32))
            l0, l1, l2, l3 = _v_slices(lo)
            h0, h1, h2, h3 = _v_slices(hi)
            t = (_fp32_quad(q0, zc, l0, h0, BLOCK_N) + _fp32_quad(q1, zc, l1, h1, BLOCK_N)
                 + _fp32_quad(q2, zc, l2, h2, BLOCK_N) + _fp32_quad(q3, zc, l3, h3, BLOCK_N))
        return acc + t * s[None, :]

    @triton.jit
    def _m1_tcl_tile(x_ptr, qw_ptr, qz_ptr, sc_ptr, out_ptr, ws_ptr, lock_ptr, N, K, k_per_split, n_split,
                     stride_zg, stride_sg, stride_om, pid_n, pid_k, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                     MODE: tl.constexpr, NUM_STAGES: tl.constexpr, PTX: tl.constexpr, u_ptr=None, h_ptr=None,
                     SILU: tl.constexpr = False, STORE_H: tl.constexpr = False, PDL: tl.constexpr = 0,
                     XPAIRS: tl.constexpr = 0):
        """One program of the M = 1 GEMV: columns ``pid_n``, K range ``pid_k`` (module docstring); without ``PTX``
        (the interpreter) the same sums in fp32 from plain shifts and masks. With ``SILU`` the input is
        ``silu(x) * u`` (``silu_mul.silu_times``: the 128 inputs of a step, before the gather's split), which the
        programs of column tile 0 also store at ``h_ptr`` with ``STORE_H``.

        The first step is peeled: its weight loads go out before ``pdl_enter`` (no kernel of a decode step writes
        weights; a requant swap's copies run between steps, and the kernel between them waits for them), so they
        overlap the wait for the kernel before; x is read only after it. A program has 2-3 steps on the 7B shapes."""
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k_lo = pid_k * k_per_split
        if PTX:  # a hint for the compiler's vectorization (the interpreter has no use for it)
            k_lo = tl.multiple_of(k_lo, STEP)
        k_hi = tl.minimum(k_lo + k_per_split, K)  # > k_lo: tc_split leaves no split empty
        q, s, z = _m1_words(qw_ptr, qz_ptr, sc_ptr, k_lo, N, offs_n, mask_n, stride_zg, stride_sg, GROUP_SIZE)
        pdl_enter(PDL)
        acc = _m1_step(tl.zeros((4, BLOCK_N), dtype=tl.float32), q, s, z, x_ptr, k_lo, offs_n, BLOCK_N, PTX, u_ptr,
                       h_ptr, pid_n, SILU, STORE_H, XPAIRS)
        for k0 in tl.range(k_lo + 128, k_hi, STEP, num_stages=NUM_STAGES):
            q, s, z = _m1_words(qw_ptr, qz_ptr, sc_ptr, k0, N, offs_n, mask_n, stride_zg, stride_sg, GROUP_SIZE)
            acc = _m1_step(acc, q, s, z, x_ptr, k0, offs_n, BLOCK_N, PTX, u_ptr, h_ptr, pid_n, SILU, STORE_H, XPAIRS)
        out = tl.sum(acc, axis=0)[None, :]
        if PTX:
            out = out * (1 << QUAD_X_EXP)
        _epilogue(out, out_ptr, ws_ptr, lock_ptr, tl.arange(0, 1), offs_n, 1, N, stride_om, pid_k, pid_n, n_split,
                  MODE)

    @triton.jit
    def _shrink_job(x_ptr, a_ptr, slots_ptr, sws_ptr, job, M, K, R, k_per_s, n_s, stride_xm, stride_as, stride_ar,
                    stride_wsp, stride_wt, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ROUNDS: tl.constexpr,
                    u_ptr=None, SILU: tl.constexpr = False, PTX: tl.constexpr = True):
        """Shrink program ``job`` of a launch's extra tiles: token ``job % M``, split ``job // M`` of ``n_s`` (none
        past M x ``n_s``); with ``SILU`` of ``silu(x) * u``, as the launch's weight tiles read it."""
        if job < M * n_s:
            shrink_split(x_ptr, a_ptr, slots_ptr, sws_ptr, job % M, job // M, K, R, k_per_s, stride_xm, 1, stride_as,
                         stride_ar, 1, stride_wsp, stride_wt, BLOCK_R, BLOCK_K, ROUNDS, u_ptr, SILU, PTX)

    @triton.jit
    def _w4_tcl_kernel(
        x_ptr, qw_ptr, qz_ptr, sc_ptr, out_ptr, ws_ptr, lock_ptr,
        M, N, K, k_per_split, n_split, stride_xm, stride_zg, stride_sg, stride_om,
        nt_all, a_ptr, slots_ptr, sws_ptr, R, k_per_s, n_s, stride_as, stride_ar, stride_wsp, stride_wt,
        GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr,
        NUM_STAGES: tl.constexpr, WARPS: tl.constexpr, BF16: tl.constexpr, MAGIC: tl.constexpr, PTX: tl.constexpr,
        SHRINK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ROUNDS: tl.constexpr,
        PRELOAD: tl.constexpr = False, PDL: tl.constexpr = 0,
    ):
        """``_tcl_tile`` over the grid; with ``SHRINK`` the column tiles from ``nt_all`` on are a LoRA shrink of
        the same x (as ``_w4_tcl_group_kernel``'s). A program waits first (``pdl_enter``), or with ``PRELOAD``
        where its branch reads what the kernel before wrote: after the first weight loads, or first in a shrink."""
        pdl_enter(0 if PRELOAD else PDL)
        # row tiles vary fastest in launch order: the programs that unpack one weight tile run together
        pid_m, pid_n, pid_k, mt = tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(0)
        shrinking = False  # a constexpr without SHRINK: the kernel then compiles no shrink branch
        if SHRINK:
            shrinking = pid_n >= nt_all
        if shrinking:
            pdl_enter(PDL if PRELOAD else 0)
            _shrink_job(x_ptr, a_ptr, slots_ptr, sws_ptr, ((pid_n - nt_all) * n_split + pid_k) * mt + pid_m, M, K,
                        R, k_per_s, n_s, stride_xm, stride_as, stride_ar, stride_wsp, stride_wt, BLOCK_R, BLOCK_K,
                        ROUNDS)
        else:
            _tcl_tile(x_ptr, qw_ptr, qz_ptr, sc_ptr, out_ptr, ws_ptr, lock_ptr, M, N, K, k_per_split, n_split,
                      stride_xm, stride_zg, stride_sg, stride_om, pid_m, pid_n, pid_k, mt, GROUP_SIZE, BLOCK_M,
                      BLOCK_N, MODE, NUM_STAGES, WARPS, BF16, MAGIC, PTX, PRELOAD, PDL)

    @triton.jit
    def _tcl_members(x_ptr, M, K, k_per_split, n_split, stride_xm, nt0, nt1, pid_m, pid, pid_k, mt,
                     qw0, qz0, sc0, out0, ws0, lk0, n0, qw1, qz1, sc1, out1, ws1, lk1, n1, qw2, qz2, sc2, out2, ws2,
                     lk2, n2, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     MODE: tl.constexpr, NUM_STAGES: tl.constexpr, WARPS: tl.constexpr, BF16: tl.constexpr,
                     MAGIC: tl.constexpr, PTX: tl.constexpr, PRELOAD: tl.constexpr, PDL: tl.constexpr):
        """Column tile ``pid`` of a grouped launch: weight 0 below ``nt0`` tiles, weight 1 below ``nt0 + nt1``, else
        weight 2 (contiguous tensors: row strides are the widths)."""
        if pid < nt0:
            _tcl_tile(x_ptr, qw0, qz0, sc0, out0, ws0, lk0, M, n0, K, k_per_split, n_split, stride_xm, n0 // 8, n0,
                      n0, pid_m, pid, pid_k, mt, GROUP_SIZE, BLOCK_M, BLOCK_N, MODE, NUM_STAGES, WARPS, BF16, MAGIC,
                      PTX, PRELOAD, PDL)
        elif pid < nt0 + nt1:
            _tcl_tile(x_ptr, qw1, qz1, sc1, out1, ws1, lk1, M, n1, K, k_per_split, n_split, stride_xm, n1 // 8, n1,
                      n1, pid_m, pid - nt0, pid_k, mt, GROUP_SIZE, BLOCK_M, BLOCK_N, MODE, NUM_STAGES, WARPS, BF16,
                      MAGIC, PTX, PRELOAD, PDL)
        else:
            _tcl_tile(x_ptr, qw2, qz2, sc2, out2, ws2, lk2, M, n2, K, k_per_split, n_split, stride_xm, n2 // 8, n2,
                      n2, pid_m, pid - nt0 - nt1, pid_k, mt, GROUP_SIZE, BLOCK_M, BLOCK_N, MODE, NUM_STAGES, WARPS,
                      BF16, MAGIC, PTX, PRELOAD, PDL)

    @triton.jit
    def _w4_tcl_group_kernel(
        x_ptr, M, K, k_per_split, n_split, stride_xm, nt0, nt1,
        qw0, qz0, sc0, out0, ws0, lk0, n0, qw1, qz1, sc1, out1, ws1, lk1, n1, qw2, qz2, sc2, out2, ws2, lk2, n2,
        nt_all, a_ptr, slots_ptr, sws_ptr, R, k_per_s, n_s, stride_as, stride_ar, stride_wsp, stride_wt,
        GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr,
        NUM_STAGES: tl.constexpr, WARPS: tl.constexpr, BF16: tl.constexpr, MAGIC: tl.constexpr, PTX: tl.constexpr,
        SHRINK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ROUNDS: tl.constexpr,
        PRELOAD: tl.constexpr = False, PDL: tl.constexpr = 0,
    ):
        """``_w4_tcl_kernel`` for 2-3 weights of one x (``_tcl_members``); with ``SHRINK`` the column tiles from
        ``nt_all`` on are a LoRA shrink of the same x (``LoRAShrink``): their programs, numbered across row tiles
        and K splits, each run one (token, shrink split) of M x ``n_s`` (``lora_sgmv_triton.shrink_split``). Waits
        as ``_w4_tcl_kernel``'s programs."""
        pdl_enter(0 if PRELOAD else PDL)
        pid_m, pid, pid_k, mt = tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(0)
        shrinking = False  # a constexpr without SHRINK: the kernel then compiles no shrink branch
        if SHRINK:
            shrinking = pid >= nt_all
        if shrinking:
            pdl_enter(PDL if PRELOAD else 0)
            _shrink_job(x_ptr, a_ptr, slots_ptr, sws_ptr, ((pid - nt_all) * n_split + pid_k) * mt + pid_m, M, K,
                        R, k_per_s, n_s, stride_xm, stride_as, stride_ar, stride_wsp, stride_wt, BLOCK_R, BLOCK_K,
                        ROUNDS)
        else:
            _tcl_members(x_ptr, M, K, k_per_split, n_split, stride_xm, nt0, nt1, pid_m, pid, pid_k, mt, qw0, qz0, sc0,
                         out0, ws0, lk0, n0, qw1, qz1, sc1, out1, ws1, lk1, n1, qw2, qz2, sc2, out2, ws2, lk2, n2,
                         GROUP_SIZE, BLOCK_M, BLOCK_N, MODE, NUM_STAGES, WARPS, BF16, MAGIC, PTX, PRELOAD, PDL)

    @triton.jit
    def _w4_tcl_m1_kernel(
        x_ptr, qw_ptr, qz_ptr, sc_ptr, out_ptr, ws_ptr, lock_ptr, N, K, k_per_split, n_split, stride_zg, stride_sg,
        stride_om, nt_all, a_ptr, slots_ptr, sws_ptr, R, k_per_s, n_s, stride_as, stride_ar, stride_wsp, u_ptr, h_ptr,
        GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr, NUM_STAGES: tl.constexpr,
        PTX: tl.constexpr, SHRINK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
        ROUNDS: tl.constexpr, SILU: tl.constexpr, STORE_H: tl.constexpr, PDL: tl.constexpr = 0,
        XPAIRS: tl.constexpr = 0,
    ):
        """``_m1_tcl_tile`` over the grid; with ``SHRINK`` the column tiles from ``nt_all`` on are a LoRA shrink
        of the same x (as ``_w4_tcl_m1_group_kernel``'s); with ``SILU`` both read ``silu(x) * u`` (``SwiGLU``). The
        weight programs call ``pdl_enter`` after their first weight loads (``_m1_tcl_tile``), the shrink ones first."""
        pid, pid_k = tl.program_id(0), tl.program_id(1)
        shrinking = False  # a constexpr without SHRINK: the kernel then compiles no shrink branch
        if SHRINK:
            shrinking = pid >= nt_all
        if shrinking:
            pdl_enter(PDL)
            _shrink_job(x_ptr, a_ptr, slots_ptr, sws_ptr, (pid - nt_all) * n_split + pid_k, 1, K, R, k_per_s, n_s,
                        0, stride_as, stride_ar, stride_wsp, 0, BLOCK_R, BLOCK_K, ROUNDS, u_ptr, SILU, PTX)
        else:
            _m1_tcl_tile(x_ptr, qw_ptr, qz_ptr, sc_ptr, out_ptr, ws_ptr, lock_ptr, N, K, k_per_split, n_split,
                         stride_zg, stride_sg, stride_om, pid, pid_k, GROUP_SIZE, BLOCK_N, MODE, NUM_STAGES, PTX,
                         u_ptr, h_ptr, SILU, STORE_H, PDL, XPAIRS)

    @triton.jit
    def _m1_members(x_ptr, K, k_per_split, n_split, nt0, nt1, pid, pid_k,
                    qw0, qz0, sc0, out0, ws0, lk0, n0, qw1, qz1, sc1, out1, ws1, lk1, n1, qw2, qz2, sc2, out2, ws2,
                    lk2, n2, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr,
                    NUM_STAGES: tl.constexpr, PTX: tl.constexpr, PDL: tl.constexpr, XPAIRS: tl.constexpr):
        """Column tile ``pid`` of a grouped M = 1 launch: weight 0 below ``nt0`` tiles, weight 1 below ``nt0 +
        nt1``, else weight 2."""
        if pid < nt0:
            _m1_tcl_tile(x_ptr, qw0, qz0, sc0, out0, ws0, lk0, n0, K, k_per_split, n_split, n0 // 8, n0, n0, pid,
                         pid_k, GROUP_SIZE, BLOCK_N, MODE, NUM_STAGES, PTX, PDL=PDL, XPAIRS=XPAIRS)
        elif pid < nt0 + nt1:
            _m1_tcl_tile(x_ptr, qw1, qz1, sc1, out1, ws1, lk1, n1, K, k_per_split, n_split, n1 // 8, n1, n1,
                         pid - nt0, pid_k, GROUP_SIZE, BLOCK_N, MODE, NUM_STAGES, PTX, PDL=PDL, XPAIRS=XPAIRS)
        else:
            _m1_tcl_tile(x_ptr, qw2, qz2, sc2, out2, ws2, lk2, n2, K, k_per_split, n_split, n2 // 8, n2, n2,
                         pid - nt0 - nt1, pid_k, GROUP_SIZE, BLOCK_N, MODE, NUM_STAGES, PTX, PDL=PDL, XPAIRS=XPAIRS)

    @triton.jit
    def _w4_tcl_m1_group_kernel(
        x_ptr, xp_ptr, K, k_per_split, n_split, nt0, nt1,
        qw0, qz0, sc0, out0, ws0, lk0, n0, qw1, qz1, sc1, out1, ws1, lk1, n1, qw2, qz2, sc2, out2, ws2, lk2, n2,
        nt_all, a_ptr, slots_ptr, sws_ptr, R, k_per_s, n_s, stride_as, stride_ar, stride_wsp,
        GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr, NUM_STAGES: tl.constexpr,
        PTX: tl.constexpr, SHRINK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
        ROUNDS: tl.constexpr, PDL: tl.constexpr = 0, XPAIRS: tl.constexpr = 0,
    ):
        """``_w4_tcl_m1_kernel`` for 2-3 weights of one x (q/k/v, gate/up) in one launch (as the group above); with
        ``SHRINK`` the column tiles from ``nt_all`` on are a LoRA shrink of the same x (``LoRAShrink``): program
        (nt_all + e, k) computes split e * n_split + k of ``n_s`` (``lora_sgmv_triton.shrink_split``). The weight
        programs read x at ``xp_ptr``: ``x_ptr`` itself, or with ``XPAIRS`` 2 its fp16 copy x * 2**-7."""
        pid, pid_k = tl.program_id(0), tl.program_id(1)
        shrinking = False  # a constexpr without SHRINK: the kernel then compiles no shrink branch
        if SHRINK:
            shrinking = pid >= nt_all
        if shrinking:
            pdl_enter(PDL)
            _shrink_job(x_ptr, a_ptr, slots_ptr, sws_ptr, (pid - nt_all) * n_split + pid_k, 1, K, R, k_per_s, n_s,
                        0, stride_as, stride_ar, stride_wsp, 0, BLOCK_R, BLOCK_K, ROUNDS)
        else:
            _m1_members(xp_ptr, K, k_per_split, n_split, nt0, nt1, pid, pid_k, qw0, qz0, sc0, out0, ws0, lk0, n0,
                        qw1, qz1, sc1, out1, ws1, lk1, n1, qw2, qz2, sc2, out2, ws2, lk2, n2, GROUP_SIZE, BLOCK_N,
                        MODE, NUM_STAGES, PTX, PDL, XPAIRS)


@dataclass(frozen=True)
class TclConfig:
    """Launch configuration of ``w4a16_tcl`` (``tcl_config`` / ``tcl_m1_config`` give the measured defaults)."""

    block_m: int = 16
    """Rows per program (the wgmma N; a power of two in 16..256; ignored at M = 1); more rows take more tiles."""
    block_n: int = 64
    """Columns per program: a power of two >= 16 * num_warps (16 rows of the wgmma M per warp)."""
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: float = 2
    """Split K until about this many programs per SM."""

    def __post_init__(self) -> None:
        pow2 = all(_pow2(v) for v in (self.block_m, self.block_n, self.num_warps))
        if not pow2 or self.block_m < 16 or self.block_n < 16 * self.num_warps:
            raise ValueError(f"block_m (>= 16), block_n (>= 16 * num_warps) and num_warps must be powers of two: "
                             f"{self}")
        if self.num_stages < 1 or self.programs_per_sm <= 0:
            raise ValueError(f"num_stages and programs_per_sm must be positive: {self}")


def tcl_config(m: int, n: int = 4096, k: int = 4096) -> TclConfig:
    """Default for 2 <= M <= ``TCL_MAX_M`` rows, N columns and K inputs: the fastest of the H100 sweeps in M's
    bucket (``benchmarks/results/tcl_h100.md``: 21 configs at each M = 2..128 on the Llama-2-7B shapes;
    ``tcl_big_m_sweep_h100.md``: 42 configs, 64- and 128-row tiles, at M = 64..256; ``tcl_sweep_s23_*_h100.md``
    and ``tcl_sweep32_s23_bfloat16_h100.md``: 6 and 8 programs per SM added, at M = 2..32; ``lab_cfg_s24_h100.txt``:
    candidates in 3 interleaved rounds at M = 2..32 after the scale load was pipelined)."""
    if m <= 8:  # 3 stages; 6 programs per SM where N <= 4096 (o_proj, down_proj), 4 where wider (session 23
        # sweep with 6 and 8 per SM, tcl_sweep_s23_*_h100.md, bf16: 11008x4096 14.2-15.0 -> 13.0-14.4 us,
        # 4096x4096 at M = 2 8.3 -> 7.7; was 4 stages, 4 per SM everywhere; it served M = 9..16 until session 24)
        return TclConfig(16, 64, 4, 3, 6 if n <= 4096 else 4)
    if m <= 16:  # 128-column tiles since the pipelined scale (session 24, lab_cfg_s24_h100.txt, medians of 3
        # interleaved rounds, bf16, M = 16: 4096x4096 8.07 -> 7.46 us, 11008x4096 13.91 -> 13.32, 4096x11008
        # 13.38 -> 13.17; at M = 2..8 they lose 2-6%)
        return TclConfig(16, 128, 4, 3, 2)
    if m <= 32:  # fastest or within 1% on all three shapes
        return TclConfig(32, 64, 4, 3, 4)
    if 64 < m <= 128 and n <= 4096 and k <= 4096:  # since the "atomic" split finish (session 18 sweep,
        # tcl_sweep_atomic_h100.md): 4096x4096 at M = 96 16.2 -> 14.4 us, at 128 15.9 -> 15.3
        return TclConfig(64, 64, 4, 3, 2)
    if m > 64 and n <= 4096:  # one 128-row tile to M = 128; a long K splits into twice the programs (11008x4096
        # at M = 128..256: 36.0 -> 32.5, 61.7 -> 51.2, 57.9 -> 53.8 us; 4096x4096 keeps one program per SM)
        return TclConfig(128, 64, 4, 3, 2 if k > 4096 else 1)
    if 128 < m <= 192:  # wide N: 128-column tiles, three row tiles fill one wave at 2 programs per SM
        # (4096x11008 at M = 192: 56.6 -> 36.0 us; at 256 the fourth row tile is a second wave: 64.5 us)
        return TclConfig(64, 128, 4, 3, 2)
    # fastest or within 1% at M = 64 (tcl_h100.md), and at 128 and 256 where N = 11008 (tcl_big_m_sweep_h100.md)
    return TclConfig(64, 64, 4, 3, 2)


def tcl_m1_config(k: int, n: int) -> TclConfig:
    """Default of the M = 1 GEMV for one K x N weight (``block_m`` unused): the fastest of the H100 sweep under the
    "atomic" split finish (``benchmarks/results/tcl_m1_sweep_atomic_h100.md``, 72 configs): 128 columns, no
    pipelining, ~4 programs per SM on 4096x4096 and ~16 on the larger 7B shapes (there 13.8 / 14.1 -> 12.5 / 12.7
    us against the 512 columns and ~2 per SM that won while each tile's last program did the cast)."""
    return TclConfig(16, 128, 4, 1, 4 if k * n <= 4096 * 4096 else 16)


def tcl_group_config(m: int, n: int) -> TclConfig | None:
    """Config of one grouped launch for M rows of 2-3 weights at most ``n`` columns wide, or None where one launch
    per weight is faster (H100 lab, session 11; the installed choice against separate launches:
    ``benchmarks/results/tcl_group_h100.md``, ``python benchmarks/tcl_bench.py --groups``). Grouping pays for
    4096-wide siblings (q/k/v) at every M to 128, for 11008-wide ones (gate/up) at M = 1..64 (M = 2..16 since the
    "atomic" split finish: ``benchmarks/results/tcl_group_s18_h100.md``; under "atomic_last" a lab read
    grouped gate/up at 0.93x / 0.76x separate launches at M = 8 / 16) but not at 128 (0.97x)."""
    if m == 1:  # 128 columns, ~16 programs per SM (session 18, end to end against 4 and 8: batch 1 445 -> 455
        # tok/s, 440 at 8; benchmarks/results/lab_m1gp*_h100.md); 4 won while each tile's last program cast
        return TclConfig(16, 128, 4, 1, 16)
    if m <= 16:  # session 23 sweep of the grouped launch (tcl_group_sweep_*_h100.md), bf16: q/k/v 19.8-20.8 ->
        # 15.5-15.6 us with 3 stages at 4 programs per SM (it had the single weights' 4 stages); gate/up in one
        # launch since the "atomic" split finish (tcl_group_s18_final), on 128-column tiles at 2 per SM since the
        # pipelined scale (session 24, lab_cfg_s24_h100.txt, medians of 3 rounds, bf16: M = 2 / 8 / 16 24.20 /
        # 24.36 / 23.65 -> 22.57 / 23.06 / 23.02 us against 64 columns at 8 per SM; q/k/v lost 4-6% that way)
        return TclConfig(16, 64, 4, 3, 4) if n <= 4096 else TclConfig(16, 128, 4, 3, 2)
    if m <= 32:  # q/k/v at 6 programs per SM: 22.4 -> 18.7 us at M = 32 (bf16, tcl_group_sweep32_bfloat16_h100.md);
        # gate/up keeps 2 (4-8 per SM lost 12-13% there)
        return TclConfig(32, 64, 4, 3, 6 if n <= 4096 else 2)
    if m <= 64:
        return TclConfig(64, 64, 4, 3, 2) if n <= 4096 else TclConfig(64, 64, 4, 2, 2)
    return TclConfig(64, 64, 4, 2, 2) if n <= 4096 and m <= 128 else None


def xpairs_ok(x: torch.Tensor) -> bool:
    """The M = 1 GEMV reads x as 32-bit fp16 pairs (``_x_pairs``, ``XPAIRS`` 1): fp16 on a GPU (compiled: the step is
    inline PTX) at a 4-byte-aligned address."""
    return x.dtype == torch.float16 and x.is_cuda and not kernels_interpreted() and x.data_ptr() % 4 == 0


def half_pairs_ok(x: torch.Tensor, x_half: torch.Tensor | None) -> bool:
    """The M = 1 GEMV reads ``x_half`` (fp16 x * 2**-7, ``XPAIRS`` 2) as pairs in place of bf16 ``x``: one row of
    x's shape, fp16 on a GPU, 4-byte aligned (fp16 x itself is read as pairs directly, unscaled)."""
    return (x_half is not None and x.dtype == torch.bfloat16 and xpairs_ok(x_half) and x_half.shape == x.shape
            and x_half.is_contiguous())


def tcl_usable(x: torch.Tensor, packed: PackedW4) -> bool:
    """True when ``w4a16_tcl`` can serve ``x`` [M, K] with ``packed``: a "tc" layout weight (scales 4-byte
    aligned: the tensor-core step reads them as pairs), fp16/bf16, 1 <= M <= ``TCL_MAX_M``, compiled Triton on CUDA
    or the Triton interpreter (``PTX`` off: the tests)."""
    return (HAS_TRITON and packed.layout == "tc" and triton_usable(x) and packed.scales.data_ptr() % 4 == 0
            and x.dtype in _MAGIC and x.dim() == 2 and 1 <= x.shape[0] <= TCL_MAX_M)


def _check(x: torch.Tensor, packs: Sequence[PackedW4], name: str) -> None:
    for p in packs:
        if not tcl_usable(x, p) or p.in_features != x.shape[1]:
            raise ValueError(f"{name} needs x [M, K] fp16/bf16 on CUDA or under the Triton interpreter (1 <= M <= "
                             f"{TCL_MAX_M}) and 'tc'-layout weights with K = {x.shape[1]} and 4-byte-aligned scales; "
                             f"got {x.dtype} {tuple(x.shape)} on {x.device}, layout {p.layout!r}, K = "
                             f"{p.in_features}, scales at byte {p.scales.data_ptr() % 4} of 4; use w4a16_linear")


def _shrink_args(shrink: LoRAShrink | None, x: torch.Tensor, permuted: bool, split: int,
                 m_tiles: int) -> tuple[torch.Tensor | None, int, list, dict]:
    """(partials or None, extra column tiles, the kernels' shrink arguments, their constexprs) for running
    ``shrink`` in a launch of ``split`` K splits x ``m_tiles`` row tiles over x [M, K]. None where it does not
    fit: more than ``SHRINK_MAX_ROWS`` rows, or x permuted for act-order (the shrink reads it in natural order)."""
    ws, extra, args = None, 0, [x, x, x, 0, 0, 0, 0, 0, 0, 0]  # placeholders: SHRINK off reads none of them
    if shrink is not None and not permuted and shrink.fits(x, SHRINK_MAX_ROWS):
        a = shrink.a_stack
        ws, k_per_s = shrink.plan(x)
        extra = triton.cdiv(x.shape[0] * ws.shape[0], split * m_tiles)  # column tiles for M x P shrink programs
        args = [a, shrink.token_slots, ws, a.shape[1], k_per_s, ws.shape[0], a.stride(0), a.stride(1), ws.stride(0),
                ws.stride(1)]
    rows = args[3]
    return ws, extra, args, {"SHRINK": ws is not None, "BLOCK_K": SHRINK_BLOCK_K, "ROUNDS": rows > SHRINK_CHUNK_R,
                             "BLOCK_R": min(SHRINK_CHUNK_R, max(16, triton.next_power_of_2(max(rows, 1))))}


def w4a16_tcl(x: torch.Tensor, packed: PackedW4, out: torch.Tensor | None = None,
              config: TclConfig | None = None, shrink: LoRAShrink | None = None,
              swiglu: SwiGLU | None = None, defer_cast: bool = False) -> torch.Tensor | PendingSums:
    """``x [M, K] @ W`` for a "tc"-layout weight (``tcl_usable``); [M, N] in x.dtype. ``packed.locks`` /
    ``packed.acc`` (or the stream's shared split-K scratch when short) are used and left zeroed. The launch also
    runs ``shrink`` (extra programs) where it fits (``_shrink_args``); it then sets ``shrink.partials``.

    With ``defer_cast``, a launch that split K returns its sums as ``PendingSums`` instead of launching
    ``cast_sums``: the caller's next kernel finishes them (one launch fewer per projection). Without a split the
    result is the usual tensor.

    With ``swiglu`` the input is ``silu(x) * swiglu.up``: at M = 1 without act-order the launch computes it as it
    loads x (its weight and shrink programs alike; column tile 0 stores it in ``swiglu.out`` when set), elsewhere
    ``swiglu.materialize`` runs first. At M > 1 every column tile would recompute the product for its x tile."""
    _check(x, [packed], "w4a16_tcl")
    permuted = packed.perm is not None
    if swiglu is not None and (x.shape[0] != 1 or permuted):
        x, swiglu = swiglu.materialize(x), None  # checks the inputs
    elif swiglu is not None:
        swiglu.check(x)
    x = (x.index_select(1, packed.perm) if packed.perm is not None else x).contiguous()
    (m, k), n = x.shape, packed.out_features
    out = check_out(out, x, m, n)
    gs = kernel_group_size(packed.group_size, k)
    sms = _num_sms(x.device.index or 0) if x.is_cuda else 132  # the interpreter: an H100's split
    if m == 1:
        cfg = config or tcl_m1_config(k, n)
        n_tiles = triton.cdiv(n, cfg.block_n)
        split, k_per = tc_split(k, n, cfg.block_n, sms, cfg.programs_per_sm)
        mode = atomic_mode(split)
        ws, locks = splitk_buffers(out, split, mode, packed.locks, n_tiles, packed.acc)
        partials, extra, sargs, skw = _shrink_args(shrink, x, permuted, split, 1)
        h = None if swiglu is None else swiglu.out
        _w4_tcl_m1_kernel[(n_tiles + extra, split)](
            x, packed.qweight, packed.qzeros, packed.scales, out, ws, locks if mode else ws, n, k, k_per, split,
            packed.qzeros.stride(0), packed.scales.stride(0), out.stride(0), n_tiles, *sargs[:-1],
            x if swiglu is None else swiglu.up.contiguous(), x if h is None else h,
            GROUP_SIZE=gs, BLOCK_N=cfg.block_n, MODE=mode, NUM_STAGES=cfg.num_stages,
            PTX=not kernels_interpreted(), num_warps=cfg.num_warps, SILU=swiglu is not None, STORE_H=h is not None,
            XPAIRS=int(swiglu is None and xpairs_ok(x)), **skw, **pdl_options(x))
        return _finish(ws, out, split, mode, defer_cast, shrink, partials)
    cfg = config or tcl_config(m, n, k)
    m_tiles, n_tiles = triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n)
    split, k_per = tc_split(k, n, cfg.block_n, sms, cfg.programs_per_sm, m_tiles)
    mode = atomic_mode(split)
    ws, locks = splitk_buffers(out, split, mode, packed.locks, m_tiles * n_tiles, packed.acc)
    partials, extra, sargs, skw = _shrink_args(shrink, x, permuted, split, m_tiles)
    _w4_tcl_kernel[(m_tiles, n_tiles + extra, split)](
        x, packed.qweight, packed.qzeros, packed.scales, out, ws, locks if mode else ws, m, n, k, k_per, split,
        x.stride(0), packed.qzeros.stride(0), packed.scales.stride(0), out.stride(0), n_tiles, *sargs,
        GROUP_SIZE=gs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, MODE=mode, NUM_STAGES=cfg.num_stages,
        WARPS=cfg.num_warps, BF16=x.dtype == torch.bfloat16, MAGIC=_MAGIC[x.dtype], PTX=not kernels_interpreted(),
        num_warps=cfg.num_warps, PRELOAD=m <= TC_PRELOAD_MAX_M, **skw, **pdl_options(x))
    return _finish(ws, out, split, mode, defer_cast, shrink, partials)


def _finish(ws: torch.Tensor, out: torch.Tensor, split: int, mode: int, defer: bool, shrink: LoRAShrink | None,
            partials: torch.Tensor | None) -> torch.Tensor | PendingSums:
    """After a single-weight launch: hand the shrink its partials, then the sums as ``PendingSums`` (``defer``
    and the "atomic" mode) or ``out`` after ``finish_splitk``."""
    if partials is not None:
        shrink.partials = partials
    if defer and mode == _MODE_ID["atomic"]:
        m, n = out.shape
        return PendingSums(ws[:m * n].view(m, n), out.dtype)
    finish_splitk(ws, out, split, mode)
    return out


def w4a16_tcl_group(x: torch.Tensor, packs: Sequence[PackedW4], config: TclConfig | None = None,
                    shrink: LoRAShrink | None = None, x_half: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``[x @ W_j]`` for 2-3 "tc"-layout weights that read ``x`` [M, K] (q/k/v, gate/up; same K, group size and
    permutation tensor, contiguous) in ONE launch; outputs [M, N_j] in x.dtype. The split-K sums and semaphores
    come from the stream's shared scratch (one slice per weight), left zeroed. The launch also runs ``shrink``
    (extra programs) where its stack has at most ``SHRINK_MAX_ROWS`` rows and x needs no permutation; it then
    sets ``shrink.partials``.

    ``x_half``: an fp16 copy of bf16 ``x`` scaled by 2**-7 (``rms_norm``'s ``x_half``): at M = 1 the weight
    programs read it as pairs (``XPAIRS`` 2), with the same bits as from ``x``; ignored where it does not apply
    (``half_pairs_ok``)."""
    _check(x, packs, "w4a16_tcl_group")
    if not share_input(x, packs):
        raise ValueError("w4a16_tcl_group needs 2-3 contiguous weights with the same K, group size and permutation "
                         "tensor; use w4a16_tcl per weight")
    first = packs[0]
    x = (x.index_select(1, first.perm) if first.perm is not None else x).contiguous()
    (m, k), widths = x.shape, [p.out_features for p in packs]
    gs = kernel_group_size(first.group_size, k)
    outs = [torch.empty(m, n, device=x.device, dtype=x.dtype) for n in widths]
    cfg = config or tcl_group_config(m, max(widths)) or tcl_config(m, max(widths), k)
    m_tiles = 1 if m == 1 else triton.cdiv(m, cfg.block_m)
    tiles = [triton.cdiv(n, cfg.block_n) for n in widths]
    sms = _num_sms(x.device.index or 0) if x.is_cuda else 132  # the interpreter: an H100's split
    split, k_per = tc_split(k, sum(widths), cfg.block_n, sms, cfg.programs_per_sm, m_tiles)
    mode = atomic_mode(split)
    bufs, sums = group_buffers(outs, split, mode, m_tiles, tiles)
    partials, extra, sargs, skw = _shrink_args(shrink, x, first.perm is not None, split, m_tiles)
    if m == 1:
        half = half_pairs_ok(x, x_half) and first.perm is None
        _w4_tcl_m1_group_kernel[(sum(tiles) + extra, split)](
            x, x_half if half else x, k, k_per, split, tiles[0], tiles[1], *group_args(packs, outs, bufs), sum(tiles),
            *sargs[:-1], GROUP_SIZE=gs, BLOCK_N=cfg.block_n, MODE=mode, NUM_STAGES=cfg.num_stages,
            PTX=not kernels_interpreted(), num_warps=cfg.num_warps, XPAIRS=2 if half else int(xpairs_ok(x)), **skw,
            **pdl_options(x))
    else:
        _w4_tcl_group_kernel[(m_tiles, sum(tiles) + extra, split)](
            x, m, k, k_per, split, x.stride(0), tiles[0], tiles[1], *group_args(packs, outs, bufs), sum(tiles),
            *sargs, GROUP_SIZE=gs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, MODE=mode,
            NUM_STAGES=cfg.num_stages, WARPS=cfg.num_warps, BF16=x.dtype == torch.bfloat16, MAGIC=_MAGIC[x.dtype],
            PTX=not kernels_interpreted(), num_warps=cfg.num_warps, PRELOAD=m <= TC_PRELOAD_MAX_M, **skw,
            **pdl_options(x))
    finish_group(bufs, sums, outs, split, mode)
    if partials is not None:
        shrink.partials = partials
    return outs
