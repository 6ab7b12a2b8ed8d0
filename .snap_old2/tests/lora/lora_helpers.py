"""PEFT adapters for the LoRA tests: built with peft itself, kept in memory as the reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}

# name -> (LoraConfig kwargs, save as safetensors?)
ADAPTER_SPECS: dict[str, tuple[dict[str, Any], bool]] = {
    "r1": (dict(r=1, lora_alpha=2, target_modules=["q_proj", "v_proj"]), True),
    "r4_rslora_all": (dict(r=4, lora_alpha=16, target_modules=list(ALL7), use_rslora=True), True),
    "r8_patterns_bin": (
        dict(
            r=8,
            lora_alpha=8,
            target_modules=r".*\.(o_proj|gate_proj|up_proj|down_proj)$",
            rank_pattern={"down_proj": 2, "model.layers.1.self_attn.o_proj": 5},
            alpha_pattern={"up_proj": 3},
        ),
        False,
    ),
    "r4_k_layer1": (dict(r=4, lora_alpha=4, target_modules=["k_proj"], layers_to_transform=[1]), True),
}


def make_peft_model(base: torch.nn.Module, seed: int, **lora_kwargs: Any) -> Any:
    """Wrap ``base`` in a PEFT LoRA model with random, non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(init_lora_weights=False, lora_dropout=0.0, **lora_kwargs)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    return model.eval()


def load_base(base_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()


def peft_projection(peft_model: Any, layer: int, module: str) -> torch.nn.Module:
    """The (possibly LoRA-wrapped) projection ``module`` of decoder layer ``layer``."""
    decoder = peft_model.get_base_model().model.layers[layer]
    return getattr(getattr(decoder, _PARENT[module]), module)


@torch.no_grad()
def peft_delta(peft_model: Any, layer: int, module: str, x: torch.Tensor) -> torch.Tensor:
    """PEFT's own LoRA delta: ``module(x) - base_layer(x)`` (zero for untargeted modules)."""
    proj = peft_projection(peft_model, layer, module)
    base = getattr(proj, "base_layer", proj)
    return proj(x) - base(x)


def module_shapes_of(hf_model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``{module: (in_features, out_features)}`` read from layer 0 of a HF Llama."""
    layer0 = hf_model.model.layers[0]
    linears = {m: getattr(getattr(layer0, _PARENT[m]), m) for m in ALL7}
    return {m: (lin.in_features, lin.out_features) for m, lin in linears.items()}


def make_batch(slots: list[int]) -> Any:
    """A ForwardBatch of one sequence whose tokens carry ``slots`` (only lora_slots matters here)."""
    from inlaid.model.batch import ForwardBatch

    t = len(slots)
    return ForwardBatch(
        input_ids=torch.zeros(t, dtype=torch.int64),
        positions=torch.arange(t),
        slot_mapping=torch.arange(t),
        query_start_loc=torch.tensor([0, t], dtype=torch.int32),
        seq_lens=torch.tensor([t], dtype=torch.int32),
        block_tables=torch.zeros(1, 1, dtype=torch.int32),
        lora_slots=torch.tensor(slots, dtype=torch.int64),
        logits_indices=torch.tensor([t - 1]),
        max_query_len=t,
        max_seq_len=t,
    )
