"""W4A16 GEMM on the standard 4-bit GPTQ layout: Triton kernel, launcher, dispatcher.

Owns the fast path of ``y = x @ W`` for 4-bit GPTQ weights. The torch reference
it is tested against is ``inlaid.kernels.gptq_dequant.gptq_linear`` (same
layout, same math); this module imports nothing from ``inlaid`` (layering rule),
so the small 4-bit unpack/repack helpers it needs live here.

Layout (4 bits, K = in_features, N = out_features, G groups):
- ``qweight`` int32 [K/8, N]: row k's code is bits ``4*(k%8) ..`` of word ``k//8``;
- ``qzeros`` int32 [G, N/8]: ``zero - 1`` packed the same way along N (read
  back as stored + 1, no wrap, like AutoGPTQ);
- ``scales`` fp16/bf16/fp32 [G, N]; ``W[k, n] = scales[g, n] * (code - zero[g, n])``.

Kernel invariant: the group of input row k is ``k // group_size`` (g_idx
"monotone"). Act-order checkpoints (arbitrary g_idx) are made monotone ONCE
at load by ``prepare_w4`` / ``prepare_act_order``: the rows of ``qweight`` are
permuted so that the sorted g_idx is ``arange(K) // group_size``, and the
permutation ``perm`` is applied to x's columns at run time (one gather per
call: ``x[:, perm] @ W[perm] == x @ W``). g_idx that cannot be sorted into
equal groups of ``group_size`` rows raise ``ValueError`` (use the reference).

The kernel fuses the dequantization into the K loop (dequantize a [BLOCK_K,
BLOCK_N] tile in registers, ``tl.dot`` in fp32). For small M it splits K over
``split_k`` programs that ``atomic_add`` fp32 partials into a zeroed fp32
buffer (cast to x.dtype afterwards): more programs in flight for a
bandwidth-bound GEMV-like problem. ``BLOCK_K`` must divide ``group_size`` so a
K tile never straddles two groups (one scale/zero row per tile).

Skinny path (``w4a16_skinny``, M <= ``SKINNY_MAX_M``): a bandwidth-bound GEMV /
skinny GEMM. Each program streams [BLOCK_K/8, BLOCK_N] tiles of packed int32
words (contiguous along N: wide vector loads, every word loaded once),
unpacks the 8 nibbles of a word with static shifts in registers, and either
FMAs them against x in fp32 (``use_dot=False``, M = 1..4: a [BLOCK_M,
BLOCK_K/8, BLOCK_N] fp32 accumulator, reduced once at the end) or runs 8
``tl.dot`` of K = BLOCK_K/8 with M padded to 16 (``use_dot=True``). Split-K
partials go to an fp32 workspace [split_k, M, N]; ``mode`` picks how they are
summed: "reduce" (a tiny second kernel sums and casts: 2 launches, no
memset) or "fixup" (one launch: each program bumps a per-tile semaphore after
storing its partial; the last one sums, casts, stores and resets the
semaphore to 0, so the zeroed lock buffer of ``PackedW4`` stays reusable and
the launch is CUDA-graph safe). ``skinny_config`` is the per-(M, N, K) table.

``w4a16_linear`` dispatches: skinny kernel for ``M <= SKINNY_MAX_M``, fused kernel for ``M <= fused_max_m``, else a
Triton dequantize to a dense [K, N] weight + ``torch.matmul`` (cuBLAS). The
default threshold comes from ``benchmarks/kernels_bench.py`` (see
docs/kernels.md). 3- and 8-bit weights: use the reference
``gptq_linear`` (dequantize + matmul). On devices where Triton cannot run
(CPU without ``TRITON_INTERPRET=1``) the dispatcher uses a torch dequantize.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

try:  # Triton is optional: CPU installs use the torch reference path.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None
    HAS_TRITON = False

logger = logging.getLogger(__name__)

DEFAULT_FUSED_MAX_M = 64
"""Largest M for which ``w4a16_linear`` uses the fused kernel (benchmark-derived default)."""
SKINNY_MAX_M = 16
"""Largest M for which ``w4a16_linear`` uses the skinny (GEMV) kernel."""
NUM_SMS = 132
"""SM count the config tables target (H100 SXM)."""


def kernels_interpreted() -> bool:
    """True when this module's kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return HAS_TRITON and type(globals().get("_w4a16_kernel")).__name__ == "InterpretedFunction"


def triton_usable(t: torch.Tensor) -> bool:
    """True when this module's Triton kernels can run on ``t``'s device (CUDA, or CPU when interpreted)."""
    return HAS_TRITON and (t.is_cuda or kernels_interpreted())


def _dot_f32(x: torch.Tensor) -> bool:
    """Upcast tl.dot operands to fp32: only for bf16 under the CPU interpreter (its bf16 dot is broken)."""
    return x.dtype == torch.bfloat16 and not x.is_cuda


@dataclass(frozen=True)
class W4Config:
    """Tile configuration of the fused kernel (all powers of two; block_k divides group_size)."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


def default_config(m: int, n: int, k: int, group_size: int) -> W4Config:
    """Heuristic tile choice for an H100-class GPU (override with ``config=``)."""
    if m <= 16:
        cfg = W4Config(block_m=16, block_n=64, block_k=128, split_k=4, num_warps=4, num_stages=4)
    elif m <= 32:
        cfg = W4Config(block_m=32, block_n=64, block_k=128, split_k=2, num_warps=4, num_stages=4)
    elif m <= 64:
        cfg = W4Config(block_m=64, block_n=64, block_k=64, split_k=2, num_warps=4, num_stages=4)
    else:
        cfg = W4Config(block_m=128, block_n=128, block_k=64, split_k=1, num_warps=8, num_stages=3)
    return fit_config(cfg, k, group_size)


def fit_config(cfg: W4Config, k: int, group_size: int) -> W4Config:
    """Shrink ``block_k`` to divide ``group_size`` and cap ``split_k`` at the number of K tiles."""
    bk = cfg.block_k
    while bk > 16 and group_size % bk:
        bk //= 2
    if group_size % bk:
        raise ValueError(f"group_size {group_size} must be a multiple of 16 for the fused W4A16 kernel")
    k_tiles = -(-k // bk)
    split = max(1, min(cfg.split_k, k_tiles))
    return W4Config(cfg.block_m, cfg.block_n, bk, split, cfg.group_m, cfg.num_warps, cfg.num_stages)


@dataclass(frozen=True)
class SkinnyConfig:
    """Tile configuration of the skinny kernel: ``block_k`` a multiple of 8 (x16 with ``use_dot``), powers of two."""

    block_m: int = 1
    block_n: int = 128
    block_k: int = 128
    split_k: int = 8
    num_warps: int = 4
    use_dot: bool = False
    mode: str = "reduce"
    """How split-K partials are summed: "reduce" (second kernel) or "fixup" (one launch, semaphores)."""

    def __post_init__(self) -> None:
        if self.mode not in ("reduce", "fixup"):
            raise ValueError(f"SkinnyConfig.mode must be 'reduce' or 'fixup', got {self.mode!r}")
        if self.block_k % 8 or (self.use_dot and (self.block_k < 128 or self.block_m < 16)):
            raise ValueError(f"block_k must be a multiple of 8 (>= 128 and block_m >= 16 with use_dot): {self}")


def skinny_config(m: int, n: int, k: int, num_sms: int = NUM_SMS) -> SkinnyConfig:
    """Table for H100-class GPUs: ~4 programs per SM, each streaming >= 2 K tiles of its column block.

    Prediction (bandwidth-bound): bytes = K*N/2 (+ scales/zeros ~1/16 more) at ~3 TB/s, e.g. 4096x4096
    ~3 us, 4096x11008 / 11008x4096 ~8 us, plus ~2 us of launch and split-K reduction.
    """
    if m <= 4:
        bm, bn, bk, dot = max(1, 1 << (m - 1).bit_length()), 128, 128, False
    else:
        bm, bn, bk, dot = 16, 64, 128, True
    num_n = -(-n // bn)
    k_tiles = -(-k // bk)
    split = max(1, min(-(-4 * num_sms // num_n), k_tiles // 2, 32))
    return SkinnyConfig(bm, bn, bk, split, 4, dot, "reduce")


if HAS_TRITON:

    @triton.jit
    def _w4a16_kernel(
        x_ptr, qw_ptr, qz_ptr, sc_ptr, out_ptr,
        M, N, K,
        stride_xm, stride_xk, stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn,
        stride_om, stride_on,
        GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        width = GROUP_M * num_n  # L2-friendly grouped ordering of output tiles
        first_m = (pid // width) * GROUP_M
        group_rows = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % group_rows
        pid_n = (pid % width) // group_rows

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        zshift = (offs_n % 8) * 4

        k_tiles = tl.cdiv(K, BLOCK_K)
        per_split = tl.cdiv(k_tiles, SPLIT_K)
        t_lo = pid_k * per_split
        t_hi = tl.minimum(t_lo + per_split, k_tiles)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t in range(t_lo, t_hi):
            offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            q = tl.load(qw_ptr + (offs_k // 8)[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                        mask=mask_k[:, None] & mask_n[None, :], other=0)
            g = (t * BLOCK_K) // GROUP_SIZE
            z = tl.load(qz_ptr + g * stride_zg + (offs_n // 8) * stride_zn, mask=mask_n, other=0)
            s = tl.load(sc_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0)
            zero = ((z >> zshift) & 0xF) + 1
            code = (q >> ((offs_k % 8) * 4)[:, None]) & 0xF
            w = (code - zero[None, :]).to(tl.float32) * s.to(tl.float32)[None, :]
            if DOT_F32:  # interpreter only: its bf16 tl.dot is wrong (triton 3.9), fp32 is exact
                acc += tl.dot(x.to(tl.float32), w)
            else:
                acc += tl.dot(x, w.to(x.dtype))

        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        mask = mask_m[:, None] & mask_n[None, :]
        if SPLIT_K == 1:
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.atomic_add(out_ptrs, acc, mask=mask)

    @triton.jit
    def _w4_skinny_kernel(
        x_ptr, qw_ptr, qz_ptr, sc_ptr, out_ptr, ws_ptr, lock_ptr,
        M, N, K, k_per_split, stride_xm, stride_qk, stride_zg, stride_sg, stride_om,
        GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr, SPLIT_P: tl.constexpr, MODE: tl.constexpr, USE_DOT: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        # MODE 0: store out directly (SPLIT_K == 1); 1: partials to ws (reduce kernel follows); 2: fixup.
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        BKW: tl.constexpr = BLOCK_K // 8
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_w = tl.arange(0, BKW)
        mask_n = offs_n < N
        mask_m = offs_m < M
        zshift = (offs_n % 8) * 4
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        if USE_DOT:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            acc3 = tl.zeros((BLOCK_M, BKW, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            rows = k0 // 8 + offs_w
            mask_w = rows * 8 < k_hi
            q = tl.load(qw_ptr + rows[:, None] * stride_qk + offs_n[None, :],
                        mask=mask_w[:, None] & mask_n[None, :], other=0)
            if GROUP_SIZE % BLOCK_K == 0:  # one group per tile: one scale/zero row
                g = k0 // GROUP_SIZE
                s = tl.load(sc_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
                z = tl.load(qz_ptr + g * stride_zg + offs_n // 8, mask=mask_n, other=0)
                zs = (((z >> zshift) & 0xF) + 1).to(tl.float32)[None, :] * s
            else:  # several groups per tile (group 32/64 with a long tile): per word-row scales
                g = (rows * 8) // GROUP_SIZE
                gm = mask_w[:, None] & mask_n[None, :]
                s = tl.load(sc_ptr + g[:, None] * stride_sg + offs_n[None, :], mask=gm, other=0.0).to(tl.float32)
                z = tl.load(qz_ptr + g[:, None] * stride_zg + (offs_n // 8)[None, :], mask=gm, other=0)
                zs = (((z >> zshift[None, :]) & 0xF) + 1).to(tl.float32) * s
            for j in tl.static_range(8):
                w = ((q >> (4 * j)) & 0xF).to(tl.float32) * s - zs  # [BKW, BN], rows k0 + 8*w + j
                xj = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_w * 8 + j)[None, :],
                             mask=mask_m[:, None] & mask_w[None, :], other=0.0)
                if USE_DOT:
                    if DOT_F32:  # interpreter only: its bf16 tl.dot is wrong (triton 3.9)
                        acc += tl.dot(xj.to(tl.float32), w)
                    else:
                        acc += tl.dot(xj, w.to(xj.dtype))
                else:
                    acc3 += xj.to(tl.float32)[:, :, None] * w[None, :, :]
        if not USE_DOT:
            acc = tl.sum(acc3, axis=1)
        mask = mask_m[:, None] & mask_n[None, :]
        if MODE == 0:
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=mask)
        else:
            tl.store(ws_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=mask)
        if MODE == 2:
            tl.debug_barrier()  # every thread's partial is issued before the release below
            lock = lock_ptr + pid_m * tl.num_programs(0) + pid_n
            arrived = tl.atomic_add(lock, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:  # last program of this output tile: sum, cast, store, reset
                offs_p = tl.arange(0, SPLIT_P)
                p_ptrs = ws_ptr + ((offs_p[:, None, None] * M + offs_m[None, :, None]) * N + offs_n[None, None, :])
                p_mask = (offs_p < SPLIT_K)[:, None, None] & mask[None, :, :]
                tot = tl.sum(tl.load(p_ptrs, mask=p_mask, other=0.0, cache_modifier=".cg"), axis=0)
                tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], tot.to(out_ptr.dtype.element_ty),
                         mask=mask)
                tl.atomic_xchg(lock, 0)

    @triton.jit
    def _splitk_reduce_kernel(ws_ptr, out_ptr, MN, N, stride_om, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for p in tl.static_range(SPLIT_K):
            acc += tl.load(ws_ptr + p * MN + offs, mask=mask, other=0.0)
        tl.store(out_ptr + (offs // N) * stride_om + offs % N, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dequant4_kernel(
        qw_ptr, qz_ptr, sc_ptr, w_ptr, N, K,
        stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn, stride_wk, stride_wn,
        GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
        q = tl.load(qw_ptr + (offs_k // 8)[:, None] * stride_qk + offs_n[None, :] * stride_qn, mask=mask, other=0)
        g = offs_k // GROUP_SIZE
        z = tl.load(qz_ptr + g[:, None] * stride_zg + (offs_n // 8)[None, :] * stride_zn, mask=mask, other=0)
        s = tl.load(sc_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=mask, other=0.0)
        zero = ((z >> ((offs_n % 8) * 4)[None, :]) & 0xF) + 1
        code = (q >> ((offs_k % 8) * 4)[:, None]) & 0xF
        w = (code - zero).to(tl.float32) * s.to(tl.float32)
        tl.store(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                 w.to(w_ptr.dtype.element_ty), mask=mask)


def _check_w4(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> None:
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be 2-D fp16/bf16/fp32 [M, K], got {x.dtype} {tuple(x.shape)}")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or qweight.dim() != 2 or qzeros.dim() != 2:
        raise ValueError("qweight and qzeros must be 2-D int32 (GPTQ layout)")
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} features, 4-bit qweight packs {k} input rows")
    if group_size < 1 or k % group_size:
        raise ValueError(f"group_size must divide K={k}, got {group_size}")
    g = k // group_size
    if scales.shape != (g, n) or qzeros.shape != (g, n // 8) or n % 8:
        raise ValueError(
            f"scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} must be [{g}, {n}] / [{g}, {n // 8}]"
        )


def w4a16_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    perm: torch.Tensor | None,
    group_size: int,
    config: W4Config | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused ``x [M, K] @ W [K, N]`` for monotone-g_idx 4-bit GPTQ tensors; returns [M, N] in x.dtype.

    ``perm`` is the act-order permutation from ``prepare_act_order`` (None when
    g_idx is already ``arange(K) // group_size``). ``group_size`` = K for one
    group per column (per-channel). ``out`` (optional, [M, N] x.dtype) is fully
    overwritten and returned. Reference: ``gptq_dequant.gptq_linear``.
    """
    _check_w4(x, qweight, qzeros, scales, group_size)
    if not triton_usable(x):
        raise ValueError("w4a16_gemm needs Triton on CUDA (or TRITON_INTERPRET=1); use w4a16_linear to fall back")
    if perm is not None:
        x = x.index_select(1, perm)
    m, k = x.shape
    n = qweight.shape[1]
    cfg = fit_config(config, k, group_size) if config is not None else default_config(m, n, k, group_size)
    if out is not None and (out.shape != (m, n) or out.dtype != x.dtype or out.device != x.device):
        raise ValueError(f"out must be [{m}, {n}] {x.dtype} on {x.device}, got {out.dtype} {tuple(out.shape)}")
    if cfg.split_k > 1:
        acc = torch.zeros(m, n, device=x.device, dtype=torch.float32)
    else:
        acc = out if out is not None else torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
    _w4a16_kernel[grid](
        x, qweight, qzeros, scales, acc, m, n, k,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), qzeros.stride(0), qzeros.stride(1),
        scales.stride(0), scales.stride(1), acc.stride(0), acc.stride(1),
        GROUP_SIZE=group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k, GROUP_M=cfg.group_m, DOT_F32=_dot_f32(x), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if out is None:
        return acc if acc.dtype == x.dtype else acc.to(x.dtype)
    return out if acc is out else out.copy_(acc)


def w4a16_skinny(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    perm: torch.Tensor | None,
    group_size: int,
    config: SkinnyConfig | None = None,
    out: torch.Tensor | None = None,
    locks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Skinny ``x [M, K] @ W [K, N]`` (GEMV-style, for small M) on monotone 4-bit tensors; [M, N] in x.dtype.

    Same contract as ``w4a16_gemm``. ``locks`` (int32, all zero, >= tiles entries) serves the "fixup"
    mode; the kernel leaves it zeroed again. Without it a zeroed buffer is allocated per call.
    """
    _check_w4(x, qweight, qzeros, scales, group_size)
    if not triton_usable(x):
        raise ValueError("w4a16_skinny needs Triton on CUDA (or TRITON_INTERPRET=1); use w4a16_linear to fall back")
    if qweight.stride(1) != 1 or qzeros.stride(1) != 1 or scales.stride(1) != 1:
        raise ValueError("qweight, qzeros and scales must be contiguous along N (use prepare_w4)")
    x = (x.index_select(1, perm) if perm is not None else x).contiguous()
    m, k = x.shape
    n = qweight.shape[1]
    cfg = config or skinny_config(m, n, k)
    if out is None:
        out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    elif out.shape != (m, n) or out.dtype != x.dtype or out.device != x.device or out.stride(1) != 1:
        raise ValueError(f"out must be [{m}, {n}] {x.dtype} on {x.device} (contiguous rows), got {out.dtype} "
                         f"{tuple(out.shape)}")
    if m == 0:
        return out
    k_tiles = -(-k // cfg.block_k)
    per = -(-k_tiles // max(1, min(cfg.split_k, k_tiles)))
    split = -(-k_tiles // per)  # no empty split
    grid = (triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, cfg.block_m))
    mode = 0 if split == 1 else (1 if cfg.mode == "reduce" else 2)
    ws = torch.empty(split, m, n, device=x.device, dtype=torch.float32) if mode else out
    if mode == 2 and (locks is None or locks.numel() < grid[0] * grid[2]):
        locks = torch.zeros(grid[0] * grid[2], device=x.device, dtype=torch.int32)
    _w4_skinny_kernel[grid](
        x, qweight, qzeros, scales, out, ws, locks if mode == 2 else ws,
        m, n, k, per * cfg.block_k, x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), out.stride(0),
        GROUP_SIZE=group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SPLIT_K=split, SPLIT_P=max(2, triton.next_power_of_2(split)), MODE=mode, USE_DOT=cfg.use_dot,
        DOT_F32=_dot_f32(x) or (x.dtype == torch.float32), num_warps=cfg.num_warps,
    )
    if mode == 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](ws, out, m * n, n, out.stride(0), SPLIT_K=split,
                                                             BLOCK=block)
    return out


def dequantize_w4(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """Dense ``W [K, N]`` in ``dtype`` from monotone-g_idx 4-bit tensors (Triton when usable, else torch)."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    if not triton_usable(qweight):
        codes = unpack4_rows(qweight)
        zeros = unpack4_rows(qzeros.t().contiguous()).t() + 1
        g = torch.arange(k, device=qweight.device) // group_size
        return ((codes - zeros[g]).float() * scales.float()[g]).to(dtype)
    w = torch.empty(k, n, device=qweight.device, dtype=dtype)
    bk, bn = 64, 64
    grid = (triton.cdiv(k, bk), triton.cdiv(n, bn))
    _dequant4_kernel[grid](
        qweight, qzeros, scales, w, n, k,
        qweight.stride(0), qweight.stride(1), qzeros.stride(0), qzeros.stride(1),
        scales.stride(0), scales.stride(1), w.stride(0), w.stride(1),
        GROUP_SIZE=group_size, BLOCK_K=bk, BLOCK_N=bn,
    )
    return w


def unpack4_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] packed along dim 0 at 4 bits -> int32 codes [8R, C] (row 8r+j = nibble j of word r)."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    codes = (packed.unsqueeze(1) >> shifts[None, :, None]) & 0xF  # [R, 8, C]
    return codes.reshape(-1, packed.shape[1])


def pack4_rows(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of ``unpack4_rows``: int codes [8R, C] in [0, 16) -> int32 [R, C]."""
    if codes.shape[0] % 8:
        raise ValueError(f"rows to pack ({codes.shape[0]}) must be a multiple of 8")
    c = codes.to(torch.int64).reshape(-1, 8, codes.shape[1])
    shifts = torch.arange(0, 32, 4, device=codes.device, dtype=torch.int64)
    words = (c << shifts[None, :, None]).sum(dim=1)  # disjoint nibbles: sum == bitwise or
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def prepare_act_order(
    qweight: torch.Tensor, g_idx: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One-time row permutation making g_idx monotone: returns ``(qweight_sorted, perm or None)``.

    ``perm`` (int64 [K]) is what ``w4a16_gemm`` gathers from x's columns;
    None when g_idx is already ``arange(K) // group_size`` (nothing to do).
    """
    k = qweight.shape[0] * 8
    if g_idx.shape != (k,):
        raise ValueError(f"g_idx must have K={k} entries, got shape {tuple(g_idx.shape)}")
    g = g_idx.to(torch.int64)
    want = torch.arange(k, device=g.device) // group_size
    if torch.equal(g, want):
        return qweight, None
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], want):
        raise ValueError(
            f"g_idx does not sort into equal groups of {group_size} rows; the fused kernel cannot use it "
            "(use gptq_dequant.gptq_linear)"
        )
    return pack4_rows(unpack4_rows(qweight)[perm]), perm.to(qweight.device)


@dataclass(frozen=True)
class PackedW4:
    """Kernel-ready 4-bit weight: monotone-g_idx tensors plus the act-order permutation (or None)."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    perm: torch.Tensor | None
    group_size: int
    locks: torch.Tensor | None = None
    """Zeroed int32 semaphores for the skinny kernel's "fixup" mode (the kernel re-zeroes them)."""

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * 8

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]


def prepare_w4(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None, group_size: int
) -> PackedW4:
    """Validate a 4-bit GPTQ checkpoint's tensors once and make them kernel-ready (``group_size=-1``: per-channel)."""
    k = qweight.shape[0] * 8
    gs = k if group_size == -1 else group_size
    if g_idx is None:
        g_idx = torch.arange(k, device=qweight.device) // gs
    qw, perm = prepare_act_order(qweight, g_idx, gs)
    _check_w4(torch.empty(0, k), qw, qzeros, scales, gs)
    n = qw.shape[1]
    locks = torch.zeros(max(1, -(-n // 16)), device=qw.device, dtype=torch.int32)
    return PackedW4(qw.contiguous(), qzeros.contiguous(), scales.contiguous(), perm, gs, locks)


def w4a16_linear(
    x: torch.Tensor,
    packed: PackedW4,
    bias: torch.Tensor | None = None,
    fused_max_m: int = DEFAULT_FUSED_MAX_M,
    config: W4Config | None = None,
    skinny_max_m: int = SKINNY_MAX_M,
) -> torch.Tensor:
    """``x [..., K] @ W (+ bias)``: skinny kernel for M <= ``skinny_max_m``, fused for M <= ``fused_max_m``, else
    dequantize + matmul (cuBLAS)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    if triton_usable(x2) and m <= min(skinny_max_m, fused_max_m) and config is None:
        y = w4a16_skinny(x2, packed.qweight, packed.qzeros, packed.scales, packed.perm, packed.group_size,
                         locks=packed.locks)
    elif triton_usable(x2) and m <= fused_max_m:
        y = w4a16_gemm(x2, packed.qweight, packed.qzeros, packed.scales, packed.perm, packed.group_size, config)
    else:
        w = dequantize_w4(packed.qweight, packed.qzeros, packed.scales, packed.group_size, x2.dtype)
        xp = x2 if packed.perm is None else x2.index_select(1, packed.perm)
        y = xp @ w
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, packed.out_features)
