"""load_adapter on real PEFT directories: weights, ranks, scalings and targets equal PEFT's own."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from lora_helpers import ADAPTER_SPECS, ALL7, peft_projection
from safetensors.torch import load_file, save_file

from inlaid.lora import load_adapter


def test_specs_cover_both_file_formats(peft_adapters) -> None:
    for name, (kwargs, safe) in ADAPTER_SPECS.items():
        path = peft_adapters[name][0]
        assert (path / "adapter_model.safetensors").is_file() == safe
        assert (path / "adapter_model.bin").is_file() == (not safe)


@pytest.mark.parametrize("name", sorted(ADAPTER_SPECS))
def test_loaded_weights_and_scalings_equal_peft(name: str, peft_adapters) -> None:
    path, model = peft_adapters[name]
    adapter = load_adapter(name, path)
    expected_keys = set()
    for layer in range(2):
        for module in ALL7:
            proj = peft_projection(model, layer, module)
            if not hasattr(proj, "lora_A"):
                continue
            expected_keys.add((layer, module))
            w = adapter.weights[(layer, module)]
            assert torch.equal(w.a, proj.lora_A["default"].weight)
            assert torch.equal(w.b, proj.lora_B["default"].weight)
            assert w.scaling == pytest.approx(proj.scaling["default"], rel=1e-12)
    assert set(adapter.weights) == expected_keys
    assert adapter.target_modules == tuple(sorted({m for _, m in expected_keys}))
    assert adapter.rank == max(w.rank for w in adapter.weights.values())
    assert adapter.name == name and adapter.path == str(path)
    assert adapter.total_bytes == sum(4 * (w.a.numel() + w.b.numel()) for w in adapter.weights.values())


def test_rank_and_alpha_patterns_and_rslora_are_honoured(peft_adapters) -> None:
    pat = load_adapter("p", peft_adapters["r8_patterns_bin"][0])
    assert pat.weights[(0, "down_proj")].rank == 2
    assert pat.weights[(0, "down_proj")].scaling == pytest.approx(8 / 2)
    assert pat.weights[(1, "o_proj")].rank == 5 and pat.weights[(0, "o_proj")].rank == 8
    assert pat.weights[(0, "up_proj")].scaling == pytest.approx(3 / 8)
    assert pat.rank == 8 and pat.alpha == 8 and not pat.use_rslora
    rs = load_adapter("rs", peft_adapters["r4_rslora_all"][0])
    assert rs.use_rslora and rs.scaling == pytest.approx(16 / 2.0)  # alpha / sqrt(r)
    assert load_adapter("k", peft_adapters["r4_k_layer1"][0]).weights.keys() == {(1, "k_proj")}


def test_keys_with_default_adapter_name_load_the_same(peft_adapters, tmp_path: Path) -> None:
    src = peft_adapters["r1"][0]
    dst = tmp_path / "with_default"
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "adapter_model.safetensors"))
    renamed = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    assert all(".lora_A.default.weight" in k or ".lora_B.default.weight" in k for k in renamed)
    save_file(renamed, str(dst / "adapter_model.safetensors"))
    a, b = load_adapter("a", src), load_adapter("b", dst)
    assert a.weights.keys() == b.weights.keys()
    for k in a.weights:
        assert torch.equal(a.weights[k].a, b.weights[k].a) and torch.equal(a.weights[k].b, b.weights[k].b)
