"""Test helper: hold the re-quantization worker at its first layer until the test opens a gate."""

from __future__ import annotations

import threading

import pytest


def hold_requant_layers(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Patch ``requantize_layer`` so every layer waits for ``gate``; ``entered`` is set when the first one does.

    Returns ``(gate, entered)``. A gate that is never opened fails the worker after 60 s instead of hanging.
    """
    from inlaid.quant import requant as requant_mod

    gate, entered = threading.Event(), threading.Event()
    real = requant_mod.requantize_layer

    def held(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        entered.set()
        assert gate.wait(60), "test gate never opened"
        return real(*a, **kw)

    monkeypatch.setattr(requant_mod, "requantize_layer", held)
    return gate, entered
