"""Fixtures for tests/lora: real PEFT adapters (on disk) and their in-memory PEFT models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lora_helpers import ADAPTER_SPECS, load_base, make_peft_model, module_shapes_of


@pytest.fixture(scope="session")
def tiny_base(tiny_llama_dir: Path) -> Any:
    return load_base(tiny_llama_dir)


@pytest.fixture(scope="session")
def tiny_shapes(tiny_base: Any) -> dict[str, tuple[int, int]]:
    return module_shapes_of(tiny_base)


@pytest.fixture(scope="session")
def peft_adapters(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    """name -> (saved PEFT dir, the PeftModel that saved it), for every spec in ADAPTER_SPECS."""
    root = tmp_path_factory.mktemp("lora_adapters")
    out = {}
    for seed, (name, (kwargs, safe)) in enumerate(sorted(ADAPTER_SPECS.items()), start=10):
        model = make_peft_model(load_base(tiny_llama_dir), seed, **kwargs)
        model.save_pretrained(str(root / name), safe_serialization=safe)
        out[name] = (root / name, model)
    return out
