"""Random PEFT LoRA adapters on a tiny HF model (written with peft itself)."""

from __future__ import annotations

from pathlib import Path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_peft_adapter(base_dir: Path, out_dir: Path, r: int = 8, seed: int = 0, scale: float = 1.0) -> str:
    """Save a LoRA adapter with random A and B (``init_lora_weights=False``) for ``base_dir``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS), init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    if scale != 1.0:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(scale)
    peft_model.save_pretrained(str(out_dir))
    return str(out_dir)
