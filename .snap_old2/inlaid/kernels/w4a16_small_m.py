"""W4A16 for small batches (2 <= M <= 16) on monotone 4-bit GPTQ tensors: Triton kernel + launcher.

Torch reference: ``inlaid.kernels.gptq_dequant.gptq_linear`` (dequantize in fp32,
cast once, matmul); layout, act-order and ``PackedW4``: ``w4_layout``.

Why a separate kernel: at M = 2..16 the weight traffic is the same as at M = 1,
so a program that unpacks each weight tile ONCE and applies it to all M rows
should cost about the M = 1 kernel's time. The general GEMV path
(``w4a16_gemv._w4_gemv_kernel``) instead loads x eight times per tile (strided)
and runs eight ``tl.dot`` of K = BLOCK_K/8 per step.

Design:
- grid ``(cdiv(N, BLOCK_N), SPLIT_K)``: a program owns BLOCK_N output columns,
  ALL rows (M <= 16) and a contiguous K range (a multiple of BLOCK_K);
- each K step loads a ``[BLOCK_K/8, BLOCK_N]`` int32 tile (each word once,
  coalesced along N, ``evict_first``) and unpacks it as one
  ``[BLOCK_K/8, 8, BLOCK_N]`` block (nibble j of word row w is input row
  ``8w + j``, so the block read row-major IS the K order: no permutation);
- ``unpack="f32"``: ``(c | 0x4B000000)`` read as fp32 is ``2**23 + c``;
  subtracting ``2**23 + zero`` gives the exact ``c - zero`` (the M = 1 kernel's
  trick). ``unpack="h16"``: the same in 16 bits, in x's dtype:
  ``c | 0x6400`` is fp16 ``1024 + c``, ``c | 0x4300`` is bf16 ``128 + c`` (both
  exact, as is the difference), so the subtraction and the scale multiply run
  on 16-bit values;
- ``variant="dot"`` (b): the block is reshaped to ``[BLOCK_K, BLOCK_N]`` and fed
  to one ``tl.dot`` against x ``[16, BLOCK_K]`` (M padded to 16, fp32
  accumulate; tensor cores). ``variant="fma"`` (a): fp32 FMAs of the scaled
  block against each of the BLOCK_M (next power of two >= M) x rows, loaded as
  contiguous ``[BLOCK_K/8, 8]`` slices; no tensor cores;
- scales: when BLOCK_K divides the group size a tile has one scale/zero row; with
  ``unpack="f32"`` and ``variant="dot"`` the scale then multiplies the dot
  result ([16, BN]) instead of the weights. Otherwise (group 32/64 under a
  longer tile, a partial last group) each word row gathers its own scale/zero
  row and the weights are scaled before the dot. Rows past K are masked;
- split-K partials (fp32) are combined as in ``w4a16_gemv`` (its ``_epilogue``):
  "atomic" (``atomic_add`` into a zeroed [M, N] workspace + a cast kernel),
  "fixup" (one launch; the last program of a tile sums, found with a per-tile
  semaphore that it resets, so ``PackedW4.locks`` stays zeroed), "reduce"
  (workspace [SPLIT_K, M, N] + a reduce kernel) or "atomic_last" (one launch
  over a zeroed [M, N] fp32 buffer, allocated per call here). No host sync,
  fixed-size buffers: CUDA-graph safe.

``SMALL_M_CONFIGS`` holds the candidate configurations a device run compares
(``benchmarks/small_m_bench.py``, ``benchmarks/results/small_m_h200.md``).
``w4a16_gemm.w4a16_linear`` calls this kernel (``SMALL_M_DEFAULT``) where the
tensor-core kernel ``w4a16_tc`` cannot run: under the CPU interpreter and for
group sizes below 128.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import MappingProxyType

import torch

from ._triton import HAS_TRITON, dot_f32, kernels_interpreted, tl, triton, triton_usable
from .w4a16_gemv import _MODE_ID, MODES, _pow2, check_kernel_inputs, check_out, finish_splitk, splitk_buffers

if HAS_TRITON:
    from .w4a16_gemv import _epilogue

__all__ = [
    "SMALL_M_CONFIGS",
    "SMALL_M_DEFAULT",
    "SMALL_M_MAX",
    "SmallMConfig",
    "kernels_interpreted",
    "small_m_split",
    "triton_usable",
    "w4a16_small_m",
]

SMALL_M_MAX = 16
"""Largest M one program serves (the dot variant pads M to 16)."""
VARIANTS = ("dot", "fma")
UNPACKS = ("f32", "h16")
_H16_MAGIC = {torch.float16: 0x6400, torch.bfloat16: 0x4300}
"""16-bit patterns of 1024 (fp16) and 128 (bf16): OR-ing a 4-bit code into the mantissa adds it exactly."""


@dataclass(frozen=True)
class SmallMConfig:
    """Launch configuration of the small-M kernel (block sizes powers of two)."""

    variant: str = "dot"
    """"dot": one tl.dot per tile, M padded to 16; "fma": fp32 FMAs per row (BLOCK_M = pow2 >= M)."""
    unpack: str = "f32"
    """"f32": 2**23 magic, fp32 subtract; "h16": 16-bit magic in x's dtype (fp16 1024 + c, bf16 128 + c)."""
    block_n: int = 128
    block_k: int = 128
    programs_per_sm: int = 4
    """Split-K is chosen so that about this many programs run per SM (when ``split_k`` is 0)."""
    split_k: int = 0
    """Explicit split-K count (capped at the K tiles); 0 = derive it from ``programs_per_sm``."""
    num_warps: int = 4
    num_stages: int = 2
    mode: str = "atomic"
    """How split-K partials are summed: "atomic", "fixup", "reduce" or "atomic_last" (module docstring)."""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS or self.unpack not in UNPACKS or self.mode not in MODES:
            raise ValueError(f"SmallMConfig: variant in {VARIANTS}, unpack in {UNPACKS}, mode in {MODES}: {self}")
        if not (_pow2(self.block_n) and _pow2(self.block_k) and self.block_n >= 16 and self.block_k >= 16):
            raise ValueError(f"SmallMConfig: block_n and block_k must be powers of two >= 16: {self}")
        if self.split_k < 0 or self.programs_per_sm < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"SmallMConfig: split_k >= 0, programs_per_sm/num_warps/num_stages >= 1: {self}")

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


SMALL_M_CONFIGS: MappingProxyType = MappingProxyType({
    "dot_f32_n128": SmallMConfig("dot", "f32", 128, 128, 4, 0, 4, 2, "atomic"),
    "dot_f32_n64": SmallMConfig("dot", "f32", 64, 128, 4, 0, 4, 2, "atomic"),
    "dot_f32_n128_s1_p8": SmallMConfig("dot", "f32", 128, 128, 8, 0, 4, 1, "atomic"),
    "dot_f32_n128_fixup": SmallMConfig("dot", "f32", 128, 128, 4, 0, 4, 2, "fixup"),
    "dot_h16_n128": SmallMConfig("dot", "h16", 128, 128, 4, 0, 4, 2, "atomic"),
    "dot_h16_n64": SmallMConfig("dot", "h16", 64, 128, 4, 0, 4, 2, "atomic"),
    "dot_h16_n256_w8": SmallMConfig("dot", "h16", 256, 128, 4, 0, 8, 2, "atomic"),
    "fma_f32_n64": SmallMConfig("fma", "f32", 64, 64, 4, 0, 4, 2, "atomic"),
})  # fmt: skip
"""Candidate configurations (name -> config), compared on the device by ``benchmarks/small_m_bench.py``."""
SMALL_M_DEFAULT = "dot_f32_n128_s1_p8"
"""The config used when none is given, and by ``w4a16_linear`` at 2 <= M <= 16: the fastest candidate on every
7B shape and M in ``benchmarks/results/small_m_h200.md`` (1.00-1.13x fp16 cuBLAS on the H200)."""


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def small_m_split(k: int, n: int, cfg: SmallMConfig, num_sms: int) -> tuple[int, int]:
    """``(split, k_per_split)``: the K tiles shared out over about ``programs_per_sm * num_sms / n_tiles``
    splits (or ``cfg.split_k``), with no empty split."""
    k_tiles = -(-k // cfg.block_k)
    want = cfg.split_k or round(cfg.programs_per_sm * num_sms / -(-n // cfg.block_n))
    per = -(-k_tiles // max(1, min(want, k_tiles)))
    return -(-k_tiles // per), per * cfg.block_k


if HAS_TRITON:

    @triton.jit
    def _unpacked_tile(qw_ptr, qz_ptr, sc_ptr, k0, k_hi, offs_w, offs_j, offs_n, mask_n, stride_qk, stride_zg,
                       stride_sg, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, UNPACK_H16: tl.constexpr,
                       SCALE_AFTER: tl.constexpr, H_DTYPE: tl.constexpr, H16_MAGIC: tl.constexpr,
                       H16_F32: tl.constexpr):
        """The unpacked [BKW, 8, BN] tile (scaled unless SCALE_AFTER; H_DTYPE with UNPACK_H16, else fp32) and the
        tile's fp32 scale ([1, 1, BN] or [BKW, 1, BN])."""
        rows = k0 // 8 + offs_w
        mask_w = rows * 8 < k_hi
        q = tl.load(qw_ptr + rows[:, None] * stride_qk + offs_n[None, :], mask=mask_w[:, None] & mask_n[None, :],
                    other=0, eviction_policy="evict_first")  # streamed once: keep L2 for x and the scales
        zshift = (offs_n % 8) * 4
        if GROUP_SIZE % BLOCK_K == 0:  # one scale/zero row for the tile: [1, 1, BN]
            g = k0 // GROUP_SIZE
            s = tl.load(sc_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, None, :]
            z = tl.load(qz_ptr + g * stride_zg + offs_n // 8, mask=mask_n, other=0)
            zc = (((z >> zshift) & 0xF) + 1)[None, None, :]
        else:  # a scale/zero row per word row (its 8 input rows share a group): [BKW, 1, BN]
            g = (rows * 8) // GROUP_SIZE
            gm = mask_w[:, None] & mask_n[None, :]
            s = tl.load(sc_ptr + g[:, None] * stride_sg + offs_n[None, :], mask=gm, other=0.0).to(tl.float32)
            s = s[:, None, :]
            z = tl.load(qz_ptr + g[:, None] * stride_zg + (offs_n // 8)[None, :], mask=gm, other=0)
            zc = (((z >> zshift[None, :]) & 0xF) + 1)[:, None, :]
        c = (q[:, None, :] >> (offs_j * 4)[None, :, None]) & 0xF  # [BKW, 8, BN] int32 codes
        if UNPACK_H16:  # 16-bit magic: fp16 0x6400 = 1024, bf16 0x4300 = 128 (exact integers up to 2048 / 256)
            cw = (c.to(tl.int16) | H16_MAGIC).to(H_DTYPE, bitcast=True)
            zw = (zc.to(tl.int16) | H16_MAGIC).to(H_DTYPE, bitcast=True)
            if H16_F32:  # bf16 under the CPU interpreter: its bf16 arithmetic is wrong, the bitcast is not
                cw = cw.to(tl.float32)
                zw = zw.to(tl.float32)
            d = cw - zw  # exact c - zero
            if not SCALE_AFTER:
                d = d * s.to(d.dtype)
        else:
            d = (c | 0x4B000000).to(tl.float32, bitcast=True) - (zc.to(tl.float32) + 8388608.0)
            if not SCALE_AFTER:
                d = d * s
        return d, s

    @triton.jit
    def _w4_small_m_kernel(
        x_ptr, qw_ptr, qz_ptr, sc_ptr, out_ptr, ws_ptr, lock_ptr,
        M, N, K, k_per_split, n_split, stride_xm, stride_qk, stride_zg, stride_sg, stride_om,
        GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        MODE: tl.constexpr, USE_DOT: tl.constexpr, UNPACK_H16: tl.constexpr, H16_MAGIC: tl.constexpr,
        SCALE_AFTER: tl.constexpr, DOT_F32: tl.constexpr, NUM_STAGES: tl.constexpr,
    ):
        # MODE 0: store out (n_split == 1); 1: partials to ws (reduce kernel follows); 2: fixup; 3: atomic_add.
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        BKW: tl.constexpr = BLOCK_K // 8
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_m = tl.arange(0, BLOCK_M)
        offs_w = tl.arange(0, BKW)
        offs_j = tl.arange(0, 8)
        offs_k = tl.arange(0, BLOCK_K)
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):
            d, s = _unpacked_tile(qw_ptr, qz_ptr, sc_ptr, k0, k_hi, offs_w, offs_j, offs_n, mask_n, stride_qk,
                                  stride_zg, stride_sg, GROUP_SIZE, BLOCK_K, UNPACK_H16, SCALE_AFTER,
                                  x_ptr.dtype.element_ty, H16_MAGIC, DOT_F32)
            if USE_DOT:
                w = tl.reshape(d, (BLOCK_K, BLOCK_N))  # row 8w + j = nibble j of word row w = K order
                kk = k0 + offs_k
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                            mask=(offs_m < M)[:, None] & (kk < k_hi)[None, :], other=0.0)
                if DOT_F32:  # fp32 inputs, or bf16 under the interpreter (its bf16 dot is wrong)
                    x = x.to(tl.float32)
                    w = w.to(tl.float32)
                else:
                    w = w.to(x.dtype)  # exact for unscaled codes (|c - zero| <= 16)
                if SCALE_AFTER:
                    acc += tl.dot(x, w) * tl.reshape(s, (1, BLOCK_N))
                else:
                    acc = tl.dot(x, w, acc)
            else:
                acc = _fma_rows(acc, x_ptr, d.to(tl.float32), k0, k_hi, M, stride_xm, offs_m, offs_w, offs_j,
                                BLOCK_M)
        _epilogue(acc, out_ptr, ws_ptr, lock_ptr, offs_m, offs_n, M, N, stride_om, pid_k, pid_n, n_split, MODE)

    @triton.jit
    def _fma_rows(acc, x_ptr, w, k0, k_hi, M, stride_xm, offs_m, offs_w, offs_j, BLOCK_M: tl.constexpr):
        """acc[r, :] += x[r, tile] @ w for each of the BLOCK_M rows (w: scaled fp32 [BKW, 8, BN])."""
        xk = k0 + offs_w[:, None] * 8 + offs_j[None, :]  # [BKW, 8]: x[8w + j] meets nibble j of word row w
        for r in tl.static_range(BLOCK_M):
            xr = tl.load(x_ptr + r * stride_xm + xk, mask=(xk < k_hi) & ((xk * 0 + r) < M), other=0.0)
            xr = xr.to(tl.float32)
            row = tl.sum(tl.sum(w * xr[:, :, None], axis=1), axis=0)  # [BN]
            acc += tl.where(offs_m[:, None] == r, row[None, :], 0.0)
        return acc


def w4a16_small_m(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    perm: torch.Tensor | None,
    group_size: int,
    config: SmallMConfig | str | None = None,
    out: torch.Tensor | None = None,
    locks: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W [K, N]`` for 1 <= M <= 16 on monotone 4-bit tensors (``w4_layout``); [M, N] in x.dtype.

    ``config``: a ``SmallMConfig``, a name of ``SMALL_M_CONFIGS``, or None (``SMALL_M_DEFAULT``). ``perm``:
    act-order permutation of ``prepare_w4`` (or None). ``out`` (optional, [M, N] x.dtype, rows contiguous) is
    fully overwritten and returned. ``locks`` (zeroed int32, >= cdiv(N, block_n) entries, e.g.
    ``PackedW4.locks``) serves the "fixup" mode and is left zeroed; without it one is allocated per call.
    """
    cfg = _resolve(config)
    gs = check_kernel_inputs(x, qweight, qzeros, scales, group_size, "w4a16_small_m")
    if not 0 <= x.shape[0] <= SMALL_M_MAX:
        raise ValueError(f"w4a16_small_m serves M <= {SMALL_M_MAX} rows, got {x.shape[0]}; use w4a16_linear")
    x = (x.index_select(1, perm) if perm is not None else x).contiguous()
    (m, k), n = x.shape, qweight.shape[1]
    out = check_out(out, x, m, n)
    if m == 0:
        return out
    sms = _num_sms(x.device.index or 0) if x.is_cuda else 132
    split, k_per = small_m_split(k, n, cfg, sms)
    n_tiles = triton.cdiv(n, cfg.block_n)
    mode = 0 if split == 1 else _MODE_ID[cfg.mode]
    ws, locks = splitk_buffers(out, split, mode, locks, n_tiles)
    use_dot = cfg.variant == "dot"
    block_m = 16 if use_dot else 1 << max(0, (m - 1).bit_length())
    h16 = cfg.unpack == "h16" and x.dtype != torch.float32
    _w4_small_m_kernel[(n_tiles, split)](
        x, qweight, qzeros, scales, out, ws, locks if mode in (2, 4) else ws,
        m, n, k, k_per, split, x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), out.stride(0),
        GROUP_SIZE=gs, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, MODE=mode, USE_DOT=use_dot,
        UNPACK_H16=h16, H16_MAGIC=_H16_MAGIC.get(x.dtype, 0), DOT_F32=dot_f32(x),
        SCALE_AFTER=use_dot and not h16 and gs % cfg.block_k == 0,
        NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
    )
    finish_splitk(ws, out, split, mode)
    return out


def _resolve(config: SmallMConfig | str | None) -> SmallMConfig:
    if config is None:
        return SMALL_M_CONFIGS[SMALL_M_DEFAULT]
    if isinstance(config, str):
        if config not in SMALL_M_CONFIGS:
            raise ValueError(f"unknown small-M config {config!r}; known: {sorted(SMALL_M_CONFIGS)}")
        return SMALL_M_CONFIGS[config]
    if not isinstance(config, SmallMConfig):
        raise ValueError(f"config must be a SmallMConfig, a name of SMALL_M_CONFIGS or None, got {type(config)}")
    return config
