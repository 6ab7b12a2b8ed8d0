"""benchmarks/train_adapters.py end to end on CPU against the tiny random Llama."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file

from inlaid.tasks.prompting import encode_example
from inlaid.tasks.registry import get_task

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_adapters.py"


@pytest.fixture(scope="module")
def train_mod() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_adapters", SCRIPT)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_encode_and_collate_mask_prompt_tokens(train_mod: ModuleType, tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    p_ids, a_ids = encode_example(tok, get_task("math_gsm"), "What is 2 + 3?", "5")
    assert tok.decode(p_ids).endswith("<|im_start|>assistant\n")
    assert a_ids[-1] == tok.eos_token_id and tok.decode(a_ids[:-1]) == "5"
    batch = train_mod.collate([(p_ids, a_ids), ([7, 8], [9])], pad_id=0, device="cpu")
    n = len(p_ids) + len(a_ids)
    assert batch["labels"][0, : len(p_ids)].eq(-100).all()
    assert batch["labels"][0, len(p_ids) : n].tolist() == a_ids
    assert batch["labels"][1].tolist()[:3] == [-100, -100, 9] and batch["attention_mask"][1].sum() == 3


@pytest.mark.slow
def test_trains_and_saves_peft_bf16_adapter(train_mod: ModuleType, tiny_llama_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    task = get_task("fortune_topic")  # rank 8 on q_proj, v_proj
    rc = train_mod.main([
        "--model-dir", str(tiny_llama_dir), "--tasks", task.name, "--steps", "4", "--max-examples", "8",
        "--batch-size", "4", "--eval-examples", "4", "--lr", "1e-2", "--out", str(tmp_path), "--base-name", "tiny",
    ])
    assert rc == 0
    entry = json.loads((tmp_path / "train_log.json").read_text())["tasks"][0]
    assert entry["task"] == task.name and entry["rank"] == 8 and entry["train_examples"] == 8
    assert entry["train_nll_after"] < entry["train_nll_before"]  # it learned its own examples
    weights = load_file(str(tmp_path / task.name / "adapter_model.safetensors"))
    assert weights and all(t.dtype == torch.bfloat16 for t in weights.values())
    assert {k.split(".")[-3] for k in weights} == {"q_proj", "v_proj"}
    b_norm = sum(float(t.float().abs().sum()) for k, t in weights.items() if "lora_B" in k)
    assert b_norm > 0  # B starts at zero; training moved it
    cfg = json.loads((tmp_path / task.name / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["base_model_name_or_path"] == "tiny"
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    loaded = PeftModel.from_pretrained(base, str(tmp_path / task.name))
    lora_b = loaded.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    want = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].float()
    assert torch.equal(lora_b.float(), want)


def test_rejects_a_directory_without_a_model(train_mod: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        train_mod.main(["--model-dir", str(tmp_path), "--tasks", "math_gsm"])
