"""Fused SwiGLU activation ``silu(gate) * up``: Triton kernel, launcher, torch reference and dispatcher.

Owns ``silu_mul(gate, up)`` with torch's rounding of ``F.silu(gate) * up``: ``silu`` is computed in fp32 as
``g / (1 + exp(-g))`` and rounded to the dtype, then the product is computed in fp32 and rounded once more.

Dispatch (``fused_ok``): the Triton kernel for same-shape CUDA tensors in fp16/bf16; the torch reference
(``silu_mul_ref``) otherwise (CPU, fp32), so CPU numerics are unchanged. On CUDA the kernel uses the same
formula with libdevice's ``expf`` and a correctly rounded division, as torch's CUDA silu (``expf``, IEEE
division) does, so the result is meant to be bit-identical there (a gpu test checks it). Under the CPU
interpreter ``exp`` is numpy's, which may differ from torch's CPU ``exp`` in the last fp32 bit: at most one
unit in the last place of the fp16/bf16 output, on rare elements (the tests bound it).

Elementwise over the flattened tensors (contiguous copies if they are not); no host sync, no data-dependent
shape (CUDA-graph capturable). Imports nothing from inlaid outside ``inlaid.kernels``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, kernels_interpreted, tl, triton, triton_usable  # noqa: F401 (re-exported)

FUSED_DTYPES = (torch.float16, torch.bfloat16)
BLOCK = 1024

if HAS_TRITON:
    from triton.language.extra import libdevice

    from .rms_norm import round_to

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr, ON_CUDA: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0)
        if ON_CUDA:  # torch CUDA: x / (1 + expf(-x)), IEEE division
            s = tl.math.div_rn(g, 1.0 + libdevice.exp(-g))
        else:
            s = g / (1.0 + tl.exp(-g))
        s = round_to(s, u.dtype, ON_CUDA)
        out = round_to(s.to(tl.float32) * u.to(tl.float32), u.dtype, ON_CUDA)
        tl.store(out_ptr + offs, out, mask=mask)


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The torch reference: ``F.silu(gate) * up``."""
    return F.silu(gate) * up


def fused_ok(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """True when ``silu_mul`` runs the Triton kernel: CUDA, Triton, fp16/bf16, same shape and dtype."""
    return (HAS_TRITON and gate.is_cuda and gate.dtype in FUSED_DTYPES and up.dtype == gate.dtype
            and up.shape == gate.shape)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``: the Triton kernel where ``fused_ok``, the torch reference otherwise."""
    if fused_ok(gate, up):
        return silu_mul_triton(gate, up)
    return silu_mul_ref(gate, up)


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``); ValueError on mismatched inputs."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                         "must have the same shape and dtype")
    if not triton_usable(gate):
        raise ValueError("silu_mul_triton: needs Triton on the tensors' device (CUDA, or TRITON_INTERPRET=1)")
    g, u = gate.contiguous(), up.contiguous()
    out = torch.empty_like(g)
    n = g.numel()
    if n > 0:
        _silu_mul_kernel[(triton.cdiv(n, BLOCK),)](g, u, out, n, BLOCK=BLOCK, ON_CUDA=gate.is_cuda, num_warps=4)
    return out
