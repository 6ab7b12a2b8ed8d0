"""Errors of the tensor-parallel runtime (no torch import)."""

from __future__ import annotations


class TPWorkerError(RuntimeError):
    """A tensor-parallel rank died, timed out or failed a step: the engine cannot go on and must be rebuilt."""
