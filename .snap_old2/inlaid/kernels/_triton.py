"""The one place the kernel modules import Triton from: availability and interpreter checks.

Owns ``HAS_TRITON``, ``triton``/``tl`` (None without Triton), ``kernels_interpreted``
and ``triton_usable``. Invariant: ``triton.jit`` decides at decoration time whether a
kernel is compiled or interpreted (``TRITON_INTERPRET=1``); ``_probe`` below is
decorated when this module is imported, so ``kernels_interpreted()`` tells how every
kernel module imported after it was built. The tests reload this module and then the
kernel module when the interpreter was switched on late (tests/kernels/triton_setup.py).
"""

from __future__ import annotations

import torch

try:  # Triton is optional: CPU installs use the torch references.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None
    HAS_TRITON = False

if HAS_TRITON:

    @triton.jit
    def _probe(x_ptr):  # never launched: its type says whether triton.jit interprets
        tl.store(x_ptr, 0)


def kernels_interpreted() -> bool:
    """True when kernels decorated now run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return HAS_TRITON and type(globals().get("_probe")).__name__ == "InterpretedFunction"


def triton_usable(t: torch.Tensor) -> bool:
    """True when the Triton kernels can run on ``t``'s device (CUDA, or CPU when interpreted)."""
    return HAS_TRITON and (t.is_cuda or kernels_interpreted())


def dot_f32(x: torch.Tensor) -> bool:
    """Upcast ``tl.dot`` operands to fp32: fp32 inputs, or bf16 under the CPU interpreter (its bf16 dot is wrong)."""
    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and not x.is_cuda)
