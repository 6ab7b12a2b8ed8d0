"""AdapterRegistry: validated add, duplicate names, remove, clear errors for unknown names."""

from __future__ import annotations

import pytest

from inlaid.lora import (
    AdapterRegistry,
    DuplicateAdapterError,
    IncompatibleAdapterError,
    UnknownAdapterError,
    load_adapter,
)


def test_add_get_remove(peft_adapters, tiny_shapes) -> None:
    reg = AdapterRegistry(tiny_shapes, num_layers=2, max_rank=8)
    a = reg.add_path("de", peft_adapters["r1"][0])
    reg.add(load_adapter("fr", peft_adapters["r4_k_layer1"][0]))
    assert reg.get("de") is a and "fr" in reg and len(reg) == 2 and reg.names() == ["de", "fr"]
    assert list(reg) == ["de", "fr"]
    assert reg.remove("de") is a
    assert "de" not in reg and reg.names() == ["fr"]


def test_duplicate_and_unknown_names(peft_adapters, tiny_shapes) -> None:
    reg = AdapterRegistry(tiny_shapes, num_layers=2, max_rank=8)
    reg.add_path("de", peft_adapters["r1"][0])
    with pytest.raises(DuplicateAdapterError, match="'de' is already registered"):
        reg.add_path("de", peft_adapters["r4_k_layer1"][0])
    with pytest.raises(DuplicateAdapterError, match="'de' is already registered"):
        reg.add(load_adapter("de", peft_adapters["r4_k_layer1"][0]))
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'es'; registered adapters: 'de'"):
        reg.get("es")
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'es'"):
        reg.remove("es")
    assert isinstance(UnknownAdapterError("x"), ValueError)


def test_add_validates_against_the_base(peft_adapters, tiny_shapes) -> None:
    reg = AdapterRegistry(tiny_shapes, num_layers=2, max_rank=4)
    with pytest.raises(IncompatibleAdapterError, match="rank 8 exceeds max_lora_rank 4"):
        reg.add_path("big", peft_adapters["r8_patterns_bin"][0])
    assert "big" not in reg and len(reg) == 0
