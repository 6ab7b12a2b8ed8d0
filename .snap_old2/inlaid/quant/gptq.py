"""GPTQ on one weight matrix given its input Hessian (Frantar et al., 2022).

Owns the pure algorithm and its result type; knows nothing of models.

Invariants:
- Input ``W`` is ``[out, in]`` (``nn.Linear`` orientation), ``H`` is ``[in, in]``;
  neither is modified. Work is fp32 on ``W``'s device.
- Quantization grid: ``code = clamp(round(w / scale) + zero, 0, 2**bits - 1)``,
  ``ŵ = scale * (code - zero)``. Scales are rounded to fp16 *before* they are
  used, so the weight the algorithm commits to (``QuantResult.weight``) equals
  what a reader of the fp16 checkpoint dequantizes, bit for bit.
- Symmetric: ``zero = 2**(bits-1)``, ``scale = 2·max|w| / (2**bits - 1)``
  (AutoGPTQ's grid). Asymmetric: range always contains 0, ``zero`` in
  ``[1, 2**bits - 1]``: a group whose zero would round to 0 uses ``zero = 1`` and
  ``scale = max(w) / (2**bits - 2)``, because the v1 checkpoint format stores
  ``zero - 1`` and other readers do not wrap the -1 back.
- ``g_idx[k]`` is the group of input column ``k`` (original order). Without
  act-order or with static groups it is ``k // group_size``; act-order without
  static groups forms groups along the permuted order.
- ``group_size`` need not divide ``in_features``: there are
  ``ceil(in_features / group_size)`` groups and the last one is partial (e.g.
  576 = 4·128 + 64). The GPTQ layout represents this as is (``g_idx`` names each
  column's group; ``scales``/``qzeros`` have one row per group); packing is
  along ``in_features`` and has its own multiple-of-32/8 rule (``pack.py``).
- Deterministic for a given input on a given device.
- Deviation from AutoGPTQ: non-static group parameters are taken from the
  *current* (error-updated) columns; the lazy block size is therefore rounded
  to a multiple of ``group_size`` so a group never straddles a block.
- ``column_loop`` (the sequential per-column quantize + error feedback inside
  one lazy block) is the one implementation of that loop: ``gptq_quantize``
  runs it on a batch of one, ``gptq_batched.gptq_quantize_many`` on one item
  per Hessian.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

logger = logging.getLogger(__name__)

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128)
_FP16_MAX = 65504.0
_FP16_MIN_SUBNORMAL = 2.0**-24


@dataclass(frozen=True)
class QuantResult:
    """One quantized matrix. Shapes: ``O`` = out_features, ``I`` = in_features, ``G`` = groups."""

    qweight: torch.Tensor  # uint8 [O, I] integer codes, original column order
    scales: torch.Tensor  # fp32 [G, O], every value exactly representable in fp16
    zeros: torch.Tensor  # int32 [G, O] integer zero points
    g_idx: torch.Tensor  # int32 [I] group of each input column
    perm: torch.Tensor | None  # int64 [I] act-order permutation (processing order), or None
    weight: torch.Tensor  # fp32 [O, I] the dequantized weight the algorithm committed to
    loss: float  # GPTQ objective Σ (w - ŵ)² / (2 [H⁻¹]_jj²); for RTN Σ (w - ŵ)²
    bits: int
    group_size: int
    sym: bool
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.0  # absolute damping added to diag(H) (after retries)

    def dequantize(self) -> torch.Tensor:
        """Recompute ``ŵ`` fp32 [O, I] from codes, scales and zeros."""
        g = self.g_idx.long()
        return (self.qweight.to(torch.int32) - self.zeros.t()[:, g]).float() * self.scales.t()[:, g]


def validate_args(weight: torch.Tensor, bits: int, group_size: int) -> None:
    """Raise ``ValueError`` naming what to fix for an unsupported configuration."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf")


def find_params(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row grid for ``x [O, k]``: ``(scale fp32 [O] fp16-exact, zero int32 [O])``."""
    maxq = 2**bits - 1
    xmin = x.min(dim=1).values.clamp(max=0)
    xmax = x.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -1.0, xmin)
    xmax = torch.where(flat, 1.0, xmax)
    scale = _fp16_exact((xmax - xmin) / maxq)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2, dtype=torch.int32)
        return scale, zero
    zero = torch.round(-xmin / scale).clamp(0, maxq).to(torch.int32)
    low = zero == 0  # v1 format cannot store zero 0 portably: use zero 1, stretch the top
    if low.any():
        scale = torch.where(low, _fp16_exact(xmax / (maxq - 1)), scale)
        zero = torch.where(low, torch.ones_like(zero), zero)
    return scale, zero


def _fp16_exact(scale: torch.Tensor) -> torch.Tensor:
    if float(scale.max()) > _FP16_MAX:
        raise ValueError(f"a quantization scale {float(scale.max()):.3g} overflows fp16; weights are too large")
    return scale.clamp(min=_FP16_MIN_SUBNORMAL).to(torch.float16).to(torch.float32)


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values of ``w`` (any shape broadcasting with scale/zero)."""
    code = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
    return code, scale * (code - zero)


def _hinv_upper(h: torch.Tensor, percdamp: float, max_retries: int) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp·I)⁻¹``; damping grows 10x per failure."""
    mean_diag = float(torch.diag(h).mean())
    pd = percdamp
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(max_retries + 1):
        damp = pd * mean_diag
        lower, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper, damp
        nxt = pd * 10 if pd > 0 else 0.01
        if attempt < max_retries:
            logger.warning("GPTQ: Hessian not positive definite at percdamp=%g; retrying with %g", pd, nxt)
        pd = nxt
    raise ValueError(
        f"Hessian is not positive definite even with percdamp={pd / 10:g} after {max_retries} retries; "
        "check the calibration data (NaN/Inf, too few samples) or raise percdamp"
    )


def _prepare(w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"Hessian shape {tuple(h.shape)} does not match in_features {w.shape[1]}")
    if not torch.isfinite(h).all():
        raise ValueError("Hessian contains NaN or Inf")
    w = w.detach().to(torch.float32).clone()
    h = h.detach().to(device=w.device, dtype=torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return w, h


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int = 128,
    sym: bool = True,
    act_order: bool = False,
    static_groups: bool = False,
    percdamp: float = 0.01,
    block_size: int = 128,
    max_retries: int = 5,
) -> QuantResult:
    """Quantize ``weight [out, in]`` with GPTQ using the input Hessian ``hessian [in, in]``."""
    validate_args(weight, bits, group_size)
    if percdamp < 0 or block_size < 1:
        raise ValueError(f"percdamp must be >= 0 and block_size >= 1, got {percdamp}, {block_size}")
    w, h = _prepare(weight, hessian)
    n_out, n_in = w.shape
    gs = n_in if group_size == -1 else group_size
    static = _static_params(w, gs, bits, sym) if (static_groups or group_size == -1) else None
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        w, h = w[:, perm], h[perm][:, perm]
    hinv, damp = _hinv_upper(h, percdamp, max_retries)
    block = max(block_size // gs, 1) * gs if group_size != -1 else block_size
    state = _LoopState(bits, gs, sym, static, perm, n_out, n_in, w.device)
    loss = 0.0
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        err = _quantize_block(w, hinv, i1, i2, state)
        loss += state.block_loss
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return state.finish(loss, bits, group_size, sym, act_order, static_groups, damp)


def _static_params(w: torch.Tensor, gs: int, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    params = [find_params(w[:, i : i + gs], bits, sym) for i in range(0, w.shape[1], gs)]
    return torch.stack([p[0] for p in params]), torch.stack([p[1] for p in params])


class _LoopState:
    """Codes, dequantized columns and group bookkeeping filled in processing order."""

    def __init__(self, bits, gs, sym, static, perm, n_out, n_in, device) -> None:
        self.bits, self.gs, self.sym, self.static, self.perm = bits, gs, sym, static, perm
        self.codes = torch.zeros(n_out, n_in, dtype=torch.float32, device=device)
        self.deq = torch.zeros_like(self.codes)
        n_groups = math.ceil(n_in / gs)
        self.scales = torch.zeros(n_groups, n_out, device=device)
        self.zeros = torch.zeros(n_groups, n_out, dtype=torch.int32, device=device)
        if static is not None:
            self.scales, self.zeros = static
        self.block_loss = 0.0

    def params_for(self, col: int, w1: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid for processing position ``col`` (``w1[:, i]`` is that column in the block)."""
        if self.static is not None:
            orig = int(self.perm[col]) if self.perm is not None else col
            g = orig // self.gs
            return self.scales[g], self.zeros[g]
        g = col // self.gs
        if col % self.gs == 0:
            self.scales[g], self.zeros[g] = find_params(w1[:, i : i + self.gs], self.bits, self.sym)
        return self.scales[g], self.zeros[g]

    def finish(self, loss, bits, group_size, sym, act_order, static_groups, damp) -> QuantResult:
        codes, deq = self.codes, self.deq
        n_in = codes.shape[1]
        g_idx = torch.arange(n_in, device=codes.device) // self.gs
        if self.perm is not None:
            inv = torch.argsort(self.perm)
            codes, deq = codes[:, inv], deq[:, inv]
            if self.static is None:
                g_idx = g_idx[inv]
        return QuantResult(
            qweight=codes.to(torch.uint8), scales=self.scales, zeros=self.zeros,
            g_idx=g_idx.to(torch.int32), perm=self.perm, weight=deq, loss=loss, bits=bits,
            group_size=group_size, sym=sym, act_order=act_order, static_groups=static_groups, damp=damp,
        )  # fmt: skip


def _quantize_block(w: torch.Tensor, hinv: torch.Tensor, i1: int, i2: int, st: _LoopState) -> torch.Tensor:
    """Quantize columns ``[i1, i2)`` with in-block error feedback; returns the block's scaled errors."""
    err, losses = column_loop(w[:, i1:i2].clone().unsqueeze(0), hinv[i1:i2, i1:i2].unsqueeze(0),
                              lambda i, w1: st.params_for(i1 + i, w1[0], i), st.bits,
                              st.codes[:, i1:i2].unsqueeze(0), st.deq[:, i1:i2].unsqueeze(0))  # fmt: skip
    st.block_loss = float(losses[0])
    return err[0]


GridFn = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``params(i, w1) -> (scale, zero)``: the grid of column ``i`` of the block ``w1``."""


def column_loop(w1: torch.Tensor, h1: torch.Tensor, params: GridFn, bits: int, codes: torch.Tensor,
                deq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """GPTQ's sequential column loop over one lazy block of ``B`` independent problems (``gptq_quantize`` runs
    it with ``B = 1``, ``gptq_batched`` with one item per Hessian).

    ``w1 [B, O, n]`` (updated in place) holds the block's columns, ``h1 [B, n, n]`` the block of the upper
    Cholesky factor of ``H⁻¹``; ``params(i, w1)`` gives column ``i``'s grid (scale, zero broadcasting to
    ``[B, O]``). Codes and dequantized values are written into ``codes``/``deq [B, O, n]`` (views of the
    caller's buffers). Returns the scaled errors ``[B, O, n]`` and each item's loss ``[B]`` (float64).
    """
    diag = torch.diagonal(h1, dim1=1, dim2=2)  # [B, n]
    err = torch.zeros_like(w1)
    losses = torch.zeros(w1.shape[0], dtype=torch.float64, device=w1.device)
    for i in range(w1.shape[-1]):
        col = w1[..., i]
        d = diag[:, i : i + 1]
        scale, zero = params(i, w1)
        code, q = quantize_with(col, scale, zero, bits)
        codes[..., i], deq[..., i] = code, q
        e = (col - q) / d
        losses += ((col - q) ** 2 / d**2).sum(dim=-1).double() / 2
        w1[..., i:] -= e.unsqueeze(-1) * h1[:, i : i + 1, i:]
        err[..., i] = e
    return err, losses


def output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ)``: equals ``‖ΔW Xᵀ‖²_F · 2/N`` when ``H = (2/N) Xᵀ X``."""
    dw = (weight.to(torch.float64) - quantized.to(torch.float64))
    return float(torch.einsum("oi,ij,oj->", dw, hessian.to(torch.float64), dw))
