"""W4A16 on the standard 4-bit GPTQ layout: the tiled fused GEMM and the ``w4a16_linear`` dispatcher.

Torch reference: ``inlaid.kernels.gptq_dequant.gptq_linear`` (same layout,
same math: dequantize in fp32, cast once, matmul). Layout, act-order and
``PackedW4``: ``w4_layout`` (re-exported here for the callers). M = 1 goes to
the GEMV kernel (``w4a16_gemv``), 2 <= M <= 128 on CUDA to the tensor-core
kernel (``w4a16_tc``), large M to dequantize + cuBLAS (``w4_dequant``).

Tiled kernel (``w4a16_gemm``, mid-size M): the fused dequantization sits in
the K loop: a ``[BLOCK_K, BLOCK_N]`` tile of packed words (each word read for
8 rows, L1 serves the repeats), the tile's scale/zero row (one row when
BLOCK_K divides the group size, else one per K row: group 32/64 under a longer
tile or one group per column), ``tl.dot`` in fp32. Rows past K (the partial
last group, the partial last tile) are masked. For small M, ``split_k``
programs ``atomic_add`` fp32 partials into a zeroed buffer, cast afterwards.

``w4a16_linear`` dispatch (per call, by M = rows of x):
M = 1: the GEMV kernel; 2 <= M <= ``TC_MAX_M`` (128): the tensor-core kernel where it runs (``w4a16_tc``:
compiled on CUDA, fp16/bf16, groups of 128k or one group); otherwise 2 <= M <= 16 take the small-M kernel
(``w4a16_small_m``; both up to ``gemv_max_m``) and larger M the tiled kernel for ``M <= fused_max_m`` (tuned
per GPU and shape in ``w4a16_configs.json``, else 64; an explicit ``fused_max_m`` also caps the tensor-core
path above 16 rows), else a Triton dequantize to a dense [K, N] weight + ``torch.matmul``. Without usable
Triton (CPU, no interpreter) a torch dequantize + matmul. Group sizes that are not a multiple of 8 (and not
one group) also take the dequantize path. ``w4a16_linear_group`` serves 2-3 weights of one x (q/k/v,
gate/up) with one launch of the GEMV (M = 1) or tensor-core kernel (2..16) when they share the input layout.

A weight in the tensor-core layout (``PackedW4.layout == "tc"``: ``serving_layout`` picks it on CUDA where K and
the group size are multiples of 128) takes ``w4a16_tcl`` for 1 <= M <= ``TCL_MAX_M`` (256; fp16/bf16, compiled; one
launch for 2-3 weights of one x where ``tcl_group_config`` says it pays) and the dequantize path otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._triton import HAS_TRITON, dot_f32, kernels_interpreted, tl, triton, triton_usable
from .w4_dequant import dequantize_w4
from .w4_layout import (
    PackedW4,
    from_tc_layout,
    kernel_group_size,
    pack4_rows,
    prepare_act_order,
    prepare_w4,
    tc_layout_fits,
    unpack4_rows,
)
from .w4a16_configs import DEFAULT_FUSED_MAX_M, gemv_config
from .w4a16_small_m import SMALL_M_MAX, w4a16_small_m
from .w4a16_tc import TC_MAX_M, tc_usable, w4a16_tc, w4a16_tc_group
from .lora_sgmv_triton import LoRAShrink
from .silu_mul import SwiGLU
from .w4a16_tcl import tcl_group_config, tcl_usable, w4a16_tcl, w4a16_tcl_group
from .w4a16_configs import fused_max_m as tuned_fused_max_m
from .w4a16_gemv import (
    GEMV_MAX_M,
    GemvConfig,
    PendingSums,
    check_kernel_inputs,
    default_gemv_config,
    m1_groupable,
    share_input,
    w4a16_gemv,
    w4a16_gemv_m1_group,
)

__all__ = [
    "DEFAULT_FUSED_MAX_M",
    "GEMV_MAX_M",
    "HAS_TRITON",
    "GemvConfig",
    "LoRAShrink",
    "PackedW4",
    "PendingSums",
    "SwiGLU",
    "W4Config",
    "default_config",
    "default_gemv_config",
    "dequantize_w4",
    "fit_config",
    "from_tc_layout",
    "kernels_interpreted",
    "pack4_rows",
    "prepare_act_order",
    "prepare_w4",
    "serving_layout",
    "triton_usable",
    "unpack4_rows",
    "w4a16_gemm",
    "w4a16_gemv",
    "w4a16_linear",
    "w4a16_linear_group",
]  # fmt: skip

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class W4Config:
    """Tile configuration of the tiled kernel (all powers of two)."""

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
    """Shrink ``block_k`` towards a divisor of ``group_size`` (>= 16) and cap ``split_k`` at the K tiles."""
    bk = cfg.block_k
    while bk > 16 and kernel_group_size(group_size, k) % bk:
        bk //= 2
    split = max(1, min(cfg.split_k, -(-k // bk)))
    return W4Config(cfg.block_m, cfg.block_n, bk, split, cfg.group_m, cfg.num_warps, cfg.num_stages)


if HAS_TRITON:

    @triton.jit
    def _w4a16_kernel(
        x_ptr, qw_ptr, qz_ptr, sc_ptr, out_ptr, M, N, K,
        stride_xm, stride_xk, stride_qk, stride_zg, stride_sg, stride_om, stride_on,
        GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_m = tl.cdiv(M, BLOCK_M)
        width = GROUP_M * tl.cdiv(N, BLOCK_N)  # L2-friendly grouped ordering of output tiles
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
            q = tl.load(qw_ptr + (offs_k // 8)[:, None] * stride_qk + offs_n[None, :],
                        mask=mask_k[:, None] & mask_n[None, :], other=0)
            if GROUP_SIZE % BLOCK_K == 0:  # one group per tile
                g = (t * BLOCK_K) // GROUP_SIZE
                z = tl.load(qz_ptr + g * stride_zg + offs_n // 8, mask=mask_n, other=0)[None, :]
                s = tl.load(sc_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0)[None, :]
            else:  # a scale/zero row per K row (cached gathers)
                g = offs_k // GROUP_SIZE
                gm = mask_k[:, None] & mask_n[None, :]
                z = tl.load(qz_ptr + g[:, None] * stride_zg + (offs_n // 8)[None, :], mask=gm, other=0)
                s = tl.load(sc_ptr + g[:, None] * stride_sg + offs_n[None, :], mask=gm, other=0.0)
            zero = ((z >> zshift[None, :]) & 0xF) + 1
            code = (q >> ((offs_k % 8) * 4)[:, None]) & 0xF
            w = (code - zero).to(tl.float32) * s.to(tl.float32)
            if DOT_F32:  # fp32 x, or bf16 under the interpreter (its bf16 tl.dot is wrong)
                acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x.dtype))
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        mask = mask_m[:, None] & mask_n[None, :]
        if SPLIT_K == 1:
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.atomic_add(out_ptrs, acc, mask=mask)


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
    """Tiled fused ``x [M, K] @ W [K, N]`` for monotone-g_idx 4-bit tensors; returns [M, N] in x.dtype.

    ``perm``: act-order permutation from ``prepare_w4`` (None when g_idx is
    monotone). ``out`` (optional, [M, N] x.dtype) is fully overwritten and returned.
    """
    gs = check_kernel_inputs(x, qweight, qzeros, scales, group_size, "w4a16_gemm")
    if perm is not None:
        x = x.index_select(1, perm)
    (m, k), n = x.shape, qweight.shape[1]
    cfg = fit_config(config, k, group_size) if config is not None else default_config(m, n, k, group_size)
    if out is not None and (out.shape != (m, n) or out.dtype != x.dtype or out.device != x.device):
        raise ValueError(f"out must be [{m}, {n}] {x.dtype} on {x.device}, got {out.dtype} {tuple(out.shape)}")
    if cfg.split_k > 1:
        acc = torch.zeros(m, n, device=x.device, dtype=torch.float32)
    else:
        acc = out if out is not None else torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
    _w4a16_kernel[grid](
        x, qweight, qzeros, scales, acc, m, n, k, x.stride(0), x.stride(1), qweight.stride(0), qzeros.stride(0),
        scales.stride(0), acc.stride(0), acc.stride(1),
        GROUP_SIZE=gs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        GROUP_M=cfg.group_m, DOT_F32=dot_f32(x), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if out is None:
        return acc if acc.dtype == x.dtype else acc.to(x.dtype)
    return out if acc is out else out.copy_(acc)


def serving_layout(qweight: torch.Tensor, group_size: int) -> str:
    """The ``PackedW4.layout`` a served 4-bit weight gets (``group_size`` as ``prepare_w4`` takes it, -1 =
    per-channel): "tc" on CUDA with compiled Triton where ``tc_layout_fits``, else "gptq". A pure function of
    the device, K and the group size, so the layer that prepares the tensors and the one that reads them back
    agree without storing it."""
    k = qweight.shape[0] * 8
    gs = k if group_size == -1 else group_size
    compiled = HAS_TRITON and qweight.is_cuda and not kernels_interpreted()
    return "tc" if compiled and tc_layout_fits(k, gs) else "gptq"


def _tc_layout_linear(x2: torch.Tensor, packed: PackedW4, shrink: LoRAShrink | None = None,
                      swiglu: SwiGLU | None = None, defer_cast: bool = False) -> torch.Tensor | PendingSums:
    """``x2 [M, K] @ W`` for a "tc"-layout weight: ``w4a16_tcl`` where it runs (with ``shrink``, ``swiglu`` and
    ``defer_cast``, which it may take), else dequantize + matmul."""
    if tcl_usable(x2, packed):
        return w4a16_tcl(x2, packed, shrink=shrink, swiglu=swiglu, defer_cast=defer_cast)
    if swiglu is not None:
        x2 = swiglu.materialize(x2)
    w = dequantize_w4(packed.qweight, packed.qzeros, packed.scales, packed.group_size, x2.dtype, layout="tc")
    return (x2 if packed.perm is None else x2.index_select(1, packed.perm)) @ w


def w4a16_linear_group(x: torch.Tensor, packs: Sequence[PackedW4], biases: Sequence[torch.Tensor | None],
                       shrink: LoRAShrink | None = None, x_half: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``[w4a16_linear(x, p, b) for each weight]`` for 2-3 weights that read the same ``x`` (q/k/v, gate/up), as
    ONE launch where the weights share their input layout (``share_input``): the M = 1 GEMV
    (``w4a16_gemv_m1_group``) for a single row, the tensor-core kernel (``w4a16_tc_group``) for 2..16 rows; larger
    M runs one ``w4a16_linear`` per weight. "tc"-layout weights group where ``tcl_group_config`` says it pays
    (``w4a16_tcl_group``: up to 128 rows for 4096-wide siblings, M = 1 and 17..64 for wider ones); at M = 1 that
    launch also runs ``shrink`` where it fits (``shrink.partials`` set; otherwise left None for the caller), and
    reads ``x_half`` (bf16 x's fp16 copy x * 2**-7, ``rms_norm``) where it can (``w4a16_tcl.half_pairs_ok``)."""
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    ys = None
    if all(p.layout == "tc" for p in packs):
        cfg = tcl_group_config(m, max(p.out_features for p in packs))
        if cfg is not None and share_input(x2, packs) and all(tcl_usable(x2, p) for p in packs):
            ys = w4a16_tcl_group(x2, packs, cfg, shrink=shrink,
                                 x_half=None if x_half is None else x_half.reshape(x2.shape))
    elif triton_usable(x2) and m == 1:
        cfg = gemv_config(x2, 1, sum(p.out_features for p in packs), k)
        if m1_groupable(x2, packs, cfg):
            ys = w4a16_gemv_m1_group(x2, packs, cfg)
    elif 2 <= m <= SMALL_M_MAX and share_input(x2, packs) and tc_usable(x2, kernel_group_size(packs[0].group_size, k)):
        # grouped 8-dot launches: 1.14-1.70x separate ones at M = 8; the natural-order form above 16 rows was
        # 0.67-0.78x at M = 32 on the 7B shapes, so it stays one launch per weight (gemv_group_h200.md)
        ys = w4a16_tc_group(x2, packs)
    if ys is None:
        return [w4a16_linear(x, p, b) for p, b in zip(packs, biases)]
    return [(y if b is None else y + b.to(y.dtype)).reshape(*x.shape[:-1], p.out_features)
            for y, p, b in zip(ys, packs, biases)]


def w4a16_linear(
    x: torch.Tensor,
    packed: PackedW4,
    bias: torch.Tensor | None = None,
    fused_max_m: int | None = None,
    config: W4Config | None = None,
    gemv_max_m: int = GEMV_MAX_M,
    gemv: GemvConfig | None = None,
    shrink: LoRAShrink | None = None,
    swiglu: SwiGLU | None = None,
    defer_cast: bool = False,
) -> torch.Tensor | PendingSums:
    """``x [..., K] @ W (+ bias)`` by the module docstring's dispatch; ``config``/``gemv`` force the tiled kernel /
    GEMV configs (and bypass the tensor-core kernel). A "tc"-layout weight's ``w4a16_tcl`` launch may also run the
    LoRA ``shrink`` (``shrink.partials`` set; otherwise left None for the caller). With ``swiglu`` (x [M, K]: the
    gate) the input is ``silu(x) * swiglu.up``, computed inside ``w4a16_tcl``'s M = 1 launch where it can be,
    by ``swiglu.materialize`` otherwise. With ``defer_cast`` (x [M, K], no bias) a split ``w4a16_tcl`` launch
    returns ``PendingSums`` for the caller's next kernel to finish (``w4a16_tcl``)."""
    if swiglu is not None and (packed.layout != "tc" or x.dim() != 2):
        x, swiglu = swiglu.materialize(x), None
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    (m, k), n = x2.shape, packed.out_features
    if packed.layout == "tc":
        if fused_max_m is not None or config is not None or gemv is not None:
            raise ValueError("fused_max_m / config / gemv choose among the GPTQ-layout kernels; this weight is in the "
                             "tensor-core layout (prepare_w4(..., layout='gptq') keeps the checkpoint's)")
        y = _tc_layout_linear(x2, packed, shrink, swiglu, defer_cast and bias is None and x.dim() == 2)
        if isinstance(y, PendingSums):
            return y
        return (y if bias is None else y + bias.to(y.dtype)).reshape(*lead, n)
    kernels = triton_usable(x2) and kernel_group_size(packed.group_size, k) % 8 == 0
    fmax = tuned_fused_max_m(x2, n, k) if fused_max_m is None else fused_max_m
    tc = kernels and config is None and gemv is None and tc_usable(x2, kernel_group_size(packed.group_size, k))
    small = kernels and 2 <= m <= SMALL_M_MAX and m <= gemv_max_m and config is None and gemv is None
    tc_max_m = TC_MAX_M if fused_max_m is None else min(TC_MAX_M, fused_max_m)
    if (small and tc) or (tc and SMALL_M_MAX < m <= tc_max_m):
        # tensor cores on an inline-PTX half2 unpack (H200, benchmarks/results/tc_sweep_h200.md: M 2..16
        # 1.05-1.50x fp16 cuBLAS; M 64 / 128 1.8-2.4x / 1.25-1.6x faster than the tiled kernel or dequantize +
        # cuBLAS, which win again at M = 256); an explicit fused_max_m also caps this path
        y = w4a16_tc(x2, packed.qweight, packed.qzeros, packed.scales, packed.perm, packed.group_size,
                     locks=packed.locks, acc=packed.acc)
    elif small:
        # each weight tile unpacked once for all rows, config SMALL_M_DEFAULT (H200: 1.00-1.13x fp16 cuBLAS at
        # M 2..16, where the tiled GEMV was 0.70-1.01x; benchmarks/results/small_m_h200.md); also the CPU
        # interpreter's path (no inline assembly there) and groups below 128
        y = w4a16_small_m(x2, packed.qweight, packed.qzeros, packed.scales, packed.perm, packed.group_size,
                          locks=packed.locks)
    elif kernels and 0 < m <= min(gemv_max_m, GEMV_MAX_M) and config is None:
        cfg = gemv or gemv_config(x2, m, n, k)
        y = w4a16_gemv(x2, packed.qweight, packed.qzeros, packed.scales, packed.perm, packed.group_size, cfg,
                       locks=packed.locks, acc=packed.acc)  # fmt: skip
    elif kernels and 0 < m <= fmax:
        y = w4a16_gemm(x2, packed.qweight, packed.qzeros, packed.scales, packed.perm, packed.group_size, config)
    else:
        w = dequantize_w4(packed.qweight, packed.qzeros, packed.scales, packed.group_size, x2.dtype)
        xp = x2 if packed.perm is None else x2.index_select(1, packed.perm)
        y = xp @ w
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, n)

