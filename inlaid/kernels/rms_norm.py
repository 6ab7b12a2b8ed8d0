"""Fused RMSNorm with an optional residual add: Triton kernel, launcher, torch reference and dispatcher.

Owns ``rms_norm(x, weight, eps, residual=None)``, the semantics of HF Llama's ``LlamaRMSNorm`` (and of
``inlaid.model.layers.RMSNorm``), optionally preceded by the residual add of a pre-norm decoder layer:

- without ``residual``: ``out = weight * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)`` (x32 = x in fp32,
  the final product rounded in the result dtype); returns ``out``.
- with ``residual``: ``r = x + residual`` (rounded to x.dtype like torch's add), then the norm of ``r``;
  returns ``(out, r)``: ``r`` is the new residual stream (a new tensor; inputs are never written).

Dispatch (``fused_ok``): the Triton kernel for CUDA tensors in fp16/bf16 with a weight of the same dtype;
the torch reference (``rms_norm_ref``, which is the model's pre-existing code) otherwise, so CPU and fp32
numerics are unchanged. One program per row; the row lives in registers (hidden <= ``MAX_HIDDEN``).

Exactness: the residual sum ``r``, the fp32 scaling, the cast and the weight product are elementwise and
correctly rounded in both paths, so they agree bit for bit. The fp32 sum of squares is not: torch reduces in
an order of its own (vectorized accumulators on CPU, a thread/warp tree on CUDA) and the kernel in another,
so ``rsqrt(mean + eps)`` can differ in its last fp32 bits. That moves an output element by at most one unit
in the last place of the output dtype, on the few elements whose fp32 value lies next to a rounding boundary
(tests/kernels/test_fused_layer_ops.py bounds both). On CUDA the kernel uses the same mean (sum times 1/N)
and the same ``rsqrtf`` as torch's CUDA code, so only the summation order differs.

``x_half`` (optional, fp16, the output's shape) also receives ``fp16(out * 2**-7)``, rounded as the M = 1 W4
GEMV's gathering step rounds its input (``w4a16_tcl``): a bf16 decode row's q/k/v and gate/up launches read it
as 32-bit pairs (``XPAIRS`` 2), with the same bits as from ``out``, instead of converting per thread.

``x`` may be a W4 projection's uncast split-K sums (``w4a16_gemv.PendingSums``: o_proj and down_proj of a
decode step, whose result goes nowhere but this norm): with a residual the kernel reads the fp32 sums, rounds
them as the cast launch would, and stores zero back, so the step has one launch fewer per projection and the
same bits.

Launches have no host sync and no data-dependent shape (CUDA-graph capturable). Imports nothing from inlaid
outside ``inlaid.kernels``.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, kernels_interpreted, pdl_options, tl, triton, triton_usable  # noqa: F401 (re-exported)
from .w4a16_gemv import X_SCALE, PendingSums

FUSED_DTYPES = (torch.float16, torch.bfloat16)
MAX_HIDDEN = 32768

if HAS_TRITON:
    from triton.language.extra import libdevice

    from ._triton import pdl_enter
    from .w4a16_gemv import H2_X_SCALE, _fp16_opaque, take_sums

    @triton.jit
    def round_to(v, DTYPE: tl.constexpr, ON_CUDA: tl.constexpr):
        """fp32 ``v`` rounded to nearest-even in ``DTYPE`` (the interpreter's own fp32->bf16 cast truncates)."""
        if DTYPE == tl.bfloat16 and not ON_CUDA:
            bits = v.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return v.to(DTYPE)

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr, rout_ptr, half_ptr, N, eps, inv_n,
        stride_x, stride_res, stride_out, stride_rout,
        HAS_RES: tl.constexpr, BLOCK: tl.constexpr, ON_CUDA: tl.constexpr, X_SUMS: tl.constexpr = False,
        PDL: tl.constexpr = 0, HALF: tl.constexpr = False,
    ):
        pdl_enter(PDL)
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        if X_SUMS:  # x: a split-K launch's fp32 sums (PendingSums; HAS_RES holds): rounded, then zeroed
            x = take_sums(x_ptr + row * stride_x + offs, mask, res_ptr.dtype.element_ty)
        else:
            x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        if HAS_RES:
            res = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0)
            x = round_to(x.to(tl.float32) + res.to(tl.float32), x.dtype, ON_CUDA)  # torch's add: fp32 op, one rounding
            tl.store(rout_ptr + row * stride_rout + offs, x, mask=mask)
        x32 = x.to(tl.float32)
        ss = tl.sum(x32 * x32, axis=0)
        if ON_CUDA:  # torch CUDA: mean = sum * (1/N) (MeanOps), rsqrt = rsqrtf
            rstd = libdevice.rsqrt(ss * inv_n + eps)
        else:  # torch CPU: mean = sum / N, rsqrt = 1 / sqrt
            rstd = 1.0 / tl.sqrt_rn(ss / N + eps)
        y = round_to(x32 * rstd, x.dtype, ON_CUDA)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        out = round_to(w.to(tl.float32) * y.to(tl.float32), out_ptr.dtype.element_ty, ON_CUDA)
        tl.store(out_ptr + row * stride_out + offs, out, mask=mask)
        if HALF:  # out * 2**-7 in fp16, rounded as the W4 GEMV's gathering step rounds it (in PTX on a GPU: LLVM
            # would otherwise fold the scaling into an fp16 multiply after the conversion)
            half = out.to(tl.float32) * H2_X_SCALE
            tl.store(half_ptr + row * N + offs, _fp16_opaque(half) if ON_CUDA else half.to(tl.float16), mask=mask)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The torch reference (HF Llama RMSNorm; with ``residual``: norm of ``x + residual``, returned with it)."""
    if residual is not None:
        x = x + residual
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * x32.to(dtype)
    return out if residual is None else (out, x)


def fused_ok(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    """True when ``rms_norm`` runs the Triton kernel: CUDA, Triton, fp16/bf16 x and weight, hidden <= MAX_HIDDEN."""
    return (HAS_TRITON and x.is_cuda and x.dtype in FUSED_DTYPES and weight.dtype == x.dtype
            and x.shape[-1] <= MAX_HIDDEN and (residual is None or residual.dtype == x.dtype))


def rms_norm(x: torch.Tensor | PendingSums, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             x_half: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``out`` or ``(out, x + residual)``: the Triton kernel where ``fused_ok``, the torch reference otherwise.

    ``x`` may be a split-K launch's ``PendingSums``: with a residual the kernel finishes them (reads, rounds to
    their dtype as the cast would, zeroes), otherwise they are materialized first; the same bits either way.
    ``x_half`` (fp16, the output's shape) also receives ``out * 2**-7`` in fp16 (module docstring)."""
    if isinstance(x, PendingSums):
        if residual is not None and residual.dtype == x.dtype and fused_ok(residual, weight, residual):
            return rms_norm_triton(x, weight, eps, residual, x_half)
        x = x.materialize()
    if fused_ok(x, weight, residual):
        return rms_norm_triton(x, weight, eps, residual, x_half)
    result = rms_norm_ref(x, weight, eps, residual)
    if x_half is not None:
        out = result if residual is None else result[0]
        x_half.copy_((out.float() * X_SCALE).view(x_half.shape))  # copy_ rounds fp32 -> fp16 to nearest
    return result


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 else t.contiguous()


def rms_norm_triton(x: torch.Tensor | PendingSums, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None,
                    x_half: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``); ValueError on shapes it cannot take.
    ``PendingSums`` need the residual (of their dtype); the kernel zeroes their sums. ``x_half``: a contiguous
    fp16 tensor of x's shape on x's device, written with ``out * 2**-7``."""
    sums = isinstance(x, PendingSums)
    if sums and (residual is None or residual.dtype != x.dtype or not x.sums.is_contiguous()):
        raise ValueError("rms_norm_triton: PendingSums need a residual of their dtype (and contiguous sums)")
    dtype = x.dtype
    x = x.sums if sums else x
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"rms_norm: weight must have shape ({n},), got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} must equal x's {tuple(x.shape)}")
    if x_half is not None and (x_half.dtype != torch.float16 or x_half.shape != x.shape or not x_half.is_contiguous()
                               or x_half.device != x.device):
        raise ValueError(f"rms_norm: x_half must be a contiguous fp16 tensor of shape {tuple(x.shape)} on {x.device}, "
                         f"got {x_half.dtype} {tuple(x_half.shape)} on {x_half.device}")
    if n > MAX_HIDDEN or not triton_usable(x):
        raise ValueError(f"rms_norm_triton: needs Triton on x's device and hidden <= {MAX_HIDDEN} (got {n})")
    x2 = _rows(x, n)
    out = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(dtype, weight.dtype))
    res2 = _rows(residual, n) if residual is not None else x2
    rout = torch.empty(x.shape, device=x.device, dtype=dtype) if residual is not None else out
    m = x2.shape[0]
    if m > 0:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(m,)](
            x2, res2, weight.contiguous(), out, rout, out if x_half is None else x_half, n, float(eps), 1.0 / n,
            x2.stride(0), res2.stride(0), n, n,
            HAS_RES=residual is not None, BLOCK=block, ON_CUDA=x.is_cuda, X_SUMS=sums, HALF=x_half is not None,
            num_warps=min(max(block // 512, 1), 16), **pdl_options(x),
        )
    return out if residual is None else (out, rout)
