"""The one place the kernel modules import Triton from: availability and interpreter checks.

Owns ``HAS_TRITON``, ``triton``/``tl`` (None without Triton), ``kernels_interpreted``, ``triton_usable`` and
the programmatic-dependent-launch switch (``pdl_options`` / ``pdl_enter`` / ``decode_batch``). Invariant:
``triton.jit`` decides at decoration time whether a kernel is compiled or interpreted (``TRITON_INTERPRET=1``);
``_probe`` below is decorated when this module is imported, so ``kernels_interpreted()`` tells how every kernel
module imported after it was built. The tests reload this module and then the kernel module when the interpreter
was switched on late (tests/kernels/triton_setup.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator

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

    @triton.jit
    def pdl_enter(PDL: tl.constexpr):
        """A program's first statement in the decode-step kernels: with ``PDL`` >= 1 wait for the kernel before
        (``griddepcontrol.wait``: its writes are visible after it), with 2 also let the next kernel launch."""
        if PDL >= 1:
            tl.extra.cuda.gdc_wait()
        if PDL >= 2:
            tl.extra.cuda.gdc_launch_dependents()


def kernels_interpreted() -> bool:
    """True when kernels decorated now run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return HAS_TRITON and type(globals().get("_probe")).__name__ == "InterpretedFunction"


def triton_usable(t: torch.Tensor) -> bool:
    """True when the Triton kernels can run on ``t``'s device (CUDA, or CPU when interpreted)."""
    return HAS_TRITON and (t.is_cuda or kernels_interpreted())


def dot_f32(x: torch.Tensor) -> bool:
    """Upcast ``tl.dot`` operands to fp32: fp32 inputs, or bf16 under the CPU interpreter (its bf16 dot is wrong)."""
    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and not x.is_cuda)


PDL_EARLY_MAX_BATCH = 1
"""The largest decode batch whose kernels, in the ``auto`` mode, let the next kernel launch from their top (mode 2;
larger batches get mode 1). Only the batch-1 GEMV has work before its wait (its first weight loads); elsewhere
early dependents just hold SMs. H100, 7B W4, graphed, mode 2 against 1, one tree
(``python benchmarks/ab_table.py benchmarks/results/e2e_pdlsweep_ _h100``): batch 1 391 -> 412 tok/s, batch 1
with 32 adapters 328 -> 352, batches 2 / 4 / 8 / 16 -1.5% / -2.5% / -3.2% / -3.0%; batch 32 with 32 adapters
-9% (``e2e_pdlmode_*``)."""


def _pdl_setting(value: str | None) -> int | None:
    """``INLAID_PDL`` as a fixed mode, or None for ``auto`` (the default)."""
    value = (value or "auto").strip().lower()
    if value == "auto":
        return None
    if value not in ("0", "1", "2"):
        raise ValueError(f"INLAID_PDL must be auto, 0, 1 or 2, got {value!r}")
    return int(value)


PDL_MODE: int | None = _pdl_setting(os.environ.get("INLAID_PDL"))
"""Programmatic dependent launch of the decode-step kernels (``INLAID_PDL``, read once at import; Hopper and
later). 1: each kernel launches with ``launch_pdl`` and waits at its top (``pdl_enter``), so its launch overlaps
the end of the kernel before; 2: it also lets the next kernel launch from there; 0: off. None (``auto``, the
default): 2 inside ``decode_batch(b)`` for ``b <= PDL_EARLY_MAX_BATCH``, else 1. H100, 7B W4 end to end, one
tree with 0 against 1 (``python benchmarks/ab_table.py benchmarks/results/e2e_pdl_ _h100``): batch 1 366 -> 386
tok/s, batch 8 2,133 -> 2,565, batch 32 with 32 adapters 6,558 -> 6,916."""

_DECODE_BATCH: contextvars.ContextVar[int | None] = contextvars.ContextVar("inlaid_decode_batch", default=None)


@contextlib.contextmanager
def decode_batch(size: int | None) -> Iterator[None]:
    """Launches inside run a decode step of ``size`` sequences, or (None) no decode step: the ``auto`` PDL mode
    picks by it. A context variable, so a thread that launches other work (the re-quantization worker) keeps its
    own mode."""
    token = _DECODE_BATCH.set(size)
    try:
        yield
    finally:
        _DECODE_BATCH.reset(token)


def pdl_mode() -> int:
    """The PDL mode of a launch made now: ``PDL_MODE`` when fixed, else by the enclosing ``decode_batch``."""
    if PDL_MODE is not None:
        return PDL_MODE
    size = _DECODE_BATCH.get()
    return 2 if size is not None and size <= PDL_EARLY_MAX_BATCH else 1


@functools.lru_cache(maxsize=None)
def _pdl_capable(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9  # griddepcontrol is sm_90+ PTX


def pdl_options(t: torch.Tensor) -> dict:
    """The ``PDL`` constexpr (and ``launch_pdl`` where on) for a launch over ``t``: ``pdl_mode()`` on compiled CUDA
    kernels of a Hopper or later GPU, else 0 (the interpreter runs no inline PTX). Every program of such a kernel
    calls ``pdl_enter`` before touching memory, so each kernel still sees all earlier kernels' writes (a kernel
    completes only after its programs waited for the one before); mixing modes within a stream is therefore
    safe too."""
    mode = pdl_mode()
    on = mode > 0 and HAS_TRITON and t.is_cuda and not kernels_interpreted() and _pdl_capable(t.device)
    return {"PDL": mode, "launch_pdl": True} if on else {"PDL": 0}
