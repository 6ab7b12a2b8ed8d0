"""The contract between the model forward and the LoRA pool.

The model never knows adapter formats: after each projection it calls
``hook.apply(layer_idx, module, x, out, batch)``, which adds the batched LoRA
deltas of every token's adapter (``batch.lora_slots``, -1 = none) to ``out`` and
returns it. ``inlaid.lora.pool.LoRAPool`` implements it.

Module names are PEFT's: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj.
"""

from __future__ import annotations

from typing import Protocol

import torch

from inlaid.model.batch import ForwardBatch

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRAHook(Protocol):
    def apply(self, layer_idx: int, module: str, x: torch.Tensor, out: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Return ``out + Σ_adapters scale·(x @ Aᵀ) @ Bᵀ`` for tokens of each adapter; x: [T, in], out: [T, out]."""
        ...

    def prepare(self, batch: ForwardBatch) -> None:
        """Build per-batch metadata (``batch.lora_meta``) once, before the layers run."""
        ...
