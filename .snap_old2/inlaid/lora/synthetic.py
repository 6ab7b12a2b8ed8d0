"""Random LoRA adapters of a base's shapes, for benchmarks and load tests.

``random_adapter`` builds one in memory; ``save_peft`` writes any LoRAAdapter as a
PEFT directory (adapter_config.json + adapter_model.safetensors) that PEFT and
``load_adapter`` read back, so benchmarks can register hundreds of adapters
without training or materialising the base in transformers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from inlaid.lora.adapter import LoRAAdapter, LoRAWeights


def random_adapter(
    name: str,
    module_shapes: Mapping[str, tuple[int, int]],
    num_layers: int,
    rank: int,
    targets: Sequence[str] | None = None,
    alpha: float | None = None,
    seed: int = 0,
    std: float = 0.02,
) -> LoRAAdapter:
    """An adapter with N(0, std) A and B on ``targets`` (default: every module) of every layer."""
    targets = tuple(targets or module_shapes)
    alpha = float(alpha if alpha is not None else 2 * rank)
    scaling = alpha / rank
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(num_layers):
        for m in targets:
            fan_in, fan_out = module_shapes[m]
            a = torch.randn(rank, fan_in, generator=gen) * std
            b = torch.randn(fan_out, rank, generator=gen) * std
            weights[(layer, m)] = LoRAWeights(a=a, b=b, scaling=scaling)
    return LoRAAdapter(name=name, path=f"<random:{name}>", rank=rank, alpha=alpha, use_rslora=False,
                       scaling=scaling, target_modules=targets, weights=weights)


def _peft_key(layer: int, module: str, which: str) -> str:
    block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"base_model.model.model.layers.{layer}.{block}.{module}.lora_{which}.weight"


def save_peft(adapter: LoRAAdapter, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
              base_model: str | None = None) -> Path:
    """Write ``adapter`` as a PEFT LoRA directory (uniform rank/alpha) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (layer, module), w in adapter.weights.items():
        tensors[_peft_key(layer, module, "A")] = w.a.to(dtype).contiguous()
        tensors[_peft_key(layer, module, "B")] = w.b.to(dtype).contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": adapter.rank, "lora_alpha": adapter.alpha,
        "target_modules": sorted(adapter.target_modules), "use_rslora": adapter.use_rslora,
        "lora_dropout": 0.0, "bias": "none", "base_model_name_or_path": base_model or adapter.base_model_name_or_path,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out
