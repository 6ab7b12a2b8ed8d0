"""Every way an adapter is rejected, with the message that says what to fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from lora_helpers import make_peft_model
from safetensors.torch import load_file, save_file
from tiny import tiny_llama_config

from inlaid.lora import (
    AdapterError,
    IncompatibleAdapterError,
    load_adapter,
    validate_adapter,
)


def _copy_with_config(src: Path, dst: Path, **changes: Any) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def _save_other_base_adapter(path: Path, **config_overrides: Any) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = tiny_llama_config(**config_overrides)
    cfg.pop("architectures")
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    make_peft_model(base, 0, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]).save_pretrained(str(path))
    return path


def test_missing_directory_and_missing_config(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter("x", tmp_path / "nope")
    with pytest.raises(AdapterError, match="not a PEFT adapter directory: adapter_config.json is missing"):
        load_adapter("x", tmp_path)


CONFIG_CASES = {
    "ia3": (dict(peft_type="IA3"), "peft_type is 'IA3'; only LORA"),
    "dora": (dict(use_dora=True), "DoRA"),
    "modules_to_save": (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    "bias": (dict(bias="lora_only"), "bias='lora_only' is not supported"),
    "lm_head_target": (dict(target_modules=["q_proj", "lm_head"]), "'lm_head': lm_head/embedding targets"),
    "embed_regex": (dict(target_modules=r".*(embed_tokens|q_proj)"), "lm_head/embedding targets"),
    "bad_rank": (dict(r=0), "'r' must be a positive integer"),
    "rank_mismatch": (dict(r=3), r"do not match the configured rank 3"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_configs_are_rejected_with_a_reason(case: str, peft_adapters, tmp_path: Path) -> None:
    changes, message = CONFIG_CASES[case]
    path = _copy_with_config(peft_adapters["r1"][0], tmp_path / case, **changes)
    with pytest.raises(AdapterError, match=message) as info:
        load_adapter("x", path)
    assert "adapter_config.json" in str(info.value) or "adapter_model" in str(info.value)


def test_corrupt_or_missing_weights(peft_adapters, tmp_path: Path) -> None:
    path = _copy_with_config(peft_adapters["r1"][0], tmp_path / "corrupt")
    (path / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterError, match="adapter_model.safetensors is not a readable safetensors file"):
        load_adapter("x", path)
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="has no adapter_model.safetensors or adapter_model.bin"):
        load_adapter("x", path)
    (path / "adapter_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(AdapterError, match=r"adapter_model.bin could not be read"):
        load_adapter("x", path)


def test_dora_and_unpaired_tensors_in_the_weights_file(peft_adapters, tmp_path: Path) -> None:
    path = _copy_with_config(peft_adapters["r1"][0], tmp_path / "t")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    key_a = next(k for k in tensors if "layers.0.self_attn.q_proj.lora_A" in k)
    dora = dict(tensors)
    dora[key_a.replace("lora_A.weight", "lora_magnitude_vector")] = torch.ones(64)
    save_file(dora, str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="DoRA magnitude"):
        load_adapter("x", path)
    unpaired = {k: v for k, v in tensors.items() if k != key_a}
    save_file(unpaired, str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="layer 0 q_proj has no lora_A weight"):
        load_adapter("x", path)


def test_adapter_for_another_base_names_module_and_shapes(tmp_path: Path, tiny_shapes) -> None:
    other = load_adapter("other", _save_other_base_adapter(tmp_path / "h32", hidden_size=32, head_dim=8))
    with pytest.raises(IncompatibleAdapterError) as info:
        validate_adapter(other, tiny_shapes, num_layers=2, max_rank=64)
    msg = str(info.value)
    assert "'other'" in msg and "layer 0 down_proj" in msg
    assert "in=128, out=64" in msg and "lora_B (32, 4)" in msg and "another base model" in msg


def test_adapter_with_more_layers_than_the_base(tmp_path: Path, tiny_shapes) -> None:
    deep = load_adapter("deep", _save_other_base_adapter(tmp_path / "l3", num_hidden_layers=3))
    with pytest.raises(IncompatibleAdapterError, match="weights for layer 2 but the base model has 2 layers"):
        validate_adapter(deep, tiny_shapes, num_layers=2, max_rank=64)
    validate_adapter(deep, tiny_shapes, num_layers=3, max_rank=64)  # fits a 3-layer base of the same width


def test_rank_above_max_and_unknown_module(peft_adapters, tiny_shapes) -> None:
    adapter = load_adapter("big", peft_adapters["r8_patterns_bin"][0])
    with pytest.raises(IncompatibleAdapterError,
                       match=r"rank 8 exceeds max_lora_rank 4; restart with --max-lora-rank 8"):
        validate_adapter(adapter, tiny_shapes, num_layers=2, max_rank=4)
    validate_adapter(adapter, tiny_shapes, num_layers=2, max_rank=8)
    attn_only = {m: s for m, s in tiny_shapes.items() if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))}
    with pytest.raises(IncompatibleAdapterError, match="module 'down_proj' .* is not a projection of the base"):
        validate_adapter(adapter, attn_only, num_layers=2, max_rank=8)


def test_errors_are_value_errors() -> None:
    assert issubclass(AdapterError, ValueError) and issubclass(IncompatibleAdapterError, AdapterError)
