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

``SwiGLU`` hands the product to a launch that computes it as it loads its input (``w4a16_tcl`` at M = 1, SwiGLU's
down_proj) instead of a launch of its own; those kernels use ``silu_times``, this kernel's math, so the product
they read (and store, where asked) has ``silu_mul``'s bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, kernels_interpreted, pdl_options, tl, triton, triton_usable  # noqa: F401 (re-exported)

FUSED_DTYPES = (torch.float16, torch.bfloat16)
BLOCK = 1024

if HAS_TRITON:
    from triton.language.extra import libdevice

    from ._triton import pdl_enter
    from .rms_norm import round_to

    @triton.jit
    def silu_times(g, u, ON_CUDA: tl.constexpr):
        """``silu(g) * u`` in u's dtype (fp16/bf16 tensors g, u) with torch's two roundings; ``ON_CUDA``: torch
        CUDA's ``x / (1 + expf(-x))`` with IEEE division, else the interpreter's exp."""
        g = g.to(tl.float32)
        if ON_CUDA:
            s = tl.math.div_rn(g, 1.0 + libdevice.exp(-g))
        else:
            s = g / (1.0 + tl.exp(-g))
        s = round_to(s, u.dtype, ON_CUDA)
        return round_to(s.to(tl.float32) * u.to(tl.float32), u.dtype, ON_CUDA)

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr, ON_CUDA: tl.constexpr,
                         PDL: tl.constexpr = 0):
        pdl_enter(PDL)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, silu_times(g, u, ON_CUDA), mask=mask)


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The torch reference: ``F.silu(gate) * up`` (into ``out`` when given)."""
    return torch.mul(F.silu(gate), up, out=out)


def fused_ok(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """True when ``silu_mul`` runs the Triton kernel: CUDA, Triton, fp16/bf16, same shape and dtype."""
    return (HAS_TRITON and gate.is_cuda and gate.dtype in FUSED_DTYPES and up.dtype == gate.dtype
            and up.shape == gate.shape)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` (into ``out`` when given): the Triton kernel where ``fused_ok``, the torch reference
    otherwise."""
    if fused_ok(gate, up):
        return silu_mul_triton(gate, up, out)
    return silu_mul_ref(gate, up, out)


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``); ValueError on mismatched inputs or ``out``
    (contiguous, gate's shape and dtype)."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                         "must have the same shape and dtype")
    if not triton_usable(gate):
        raise ValueError("silu_mul_triton: needs Triton on the tensors' device (CUDA, or TRITON_INTERPRET=1)")
    if out is not None and (out.shape != gate.shape or out.dtype != gate.dtype or not out.is_contiguous()):
        raise ValueError(f"silu_mul: out must be contiguous {tuple(gate.shape)} {gate.dtype}, got "
                         f"{tuple(out.shape)} {out.dtype}")
    g, u = gate.contiguous(), up.contiguous()
    out = torch.empty_like(g) if out is None else out
    n = g.numel()
    if n > 0:
        _silu_mul_kernel[(triton.cdiv(n, BLOCK),)](g, u, out, n, BLOCK=BLOCK, ON_CUDA=gate.is_cuda, num_warps=4,
                                                    **pdl_options(gate))
    return out


@dataclass
class SwiGLU:
    """A projection's input given as ``silu(gate) * up`` (SwiGLU's down_proj; the launch's x is the gate).

    A launch that takes it computes the product as it loads x (``w4a16_tcl`` at M = 1: no ``silu_mul`` launch);
    every other path calls ``materialize`` first. ``out``, when set, receives the product (``silu_mul``'s bits)
    on every path, for a reader after the launch (the LoRA hook's fallback shrink)."""

    up: torch.Tensor
    out: torch.Tensor | None = None

    def check(self, gate: torch.Tensor) -> None:
        """ValueError unless ``up`` has the gate's shape and dtype and ``out`` (if set) is also contiguous."""
        for name, t in (("up", self.up), ("out", self.out)):
            if t is not None and (t.shape != gate.shape or t.dtype != gate.dtype
                                  or (name == "out" and not t.is_contiguous())):
                raise ValueError(f"SwiGLU: {name} must be {tuple(gate.shape)} {gate.dtype} like the gate"
                                 f"{' (contiguous)' if name == 'out' else ''}, got {tuple(t.shape)} {t.dtype}")

    def materialize(self, gate: torch.Tensor) -> torch.Tensor:
        """``silu_mul(gate, up)``, in ``out`` when set."""
        self.check(gate)
        return silu_mul(gate, self.up, self.out)
