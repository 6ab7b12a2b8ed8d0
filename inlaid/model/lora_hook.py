"""The contract between the model forward and the LoRA pool.

The model never knows adapter formats: after each projection it calls
``hook.apply(layer_idx, module, x, out, batch)``, which adds the batched LoRA
deltas of every token's adapter (``batch.lora_slots``, -1 = none) to ``out`` and
returns it; projections that read the same x (q/k/v, gate/up) go through one
``hook.apply_group`` call instead, so the hook can batch their kernels.
``inlaid.lora.pool.LoRAPool`` implements it.

Optional: ``hook.offer_shrink(layer_idx, modules, x, batch)``, called before each base projection (a group's
names, or one name), may return a ``LoRAShrink`` that the base launch runs beside its own work (the W4 kernels
on the tensor-core layout) and fills in; the following ``apply_group`` / ``apply`` must work whether or not it
was filled. ``offer_shrink`` may keep ``x`` (to match it in ``apply``) but must not read its values: for
down_proj it is the buffer the base launch writes ``silu(gate) * up`` into (``llama._project`` with ``up``).

Module names are PEFT's: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from inlaid.model.batch import ForwardBatch

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRAHook(Protocol):
    def apply(self, layer_idx: int, module: str, x: torch.Tensor, out: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Return ``out + Σ_adapters scale·(x @ Aᵀ) @ Bᵀ`` for tokens of each adapter; x: [T, in], out: [T, out]."""
        ...

    def apply_group(self, layer_idx: int, modules: Sequence[str], x: torch.Tensor, outs: Sequence[torch.Tensor],
                    batch: ForwardBatch) -> list[torch.Tensor]:
        """``apply`` for each ``(modules[j], outs[j])``, all reading ``x``; returns the updated outputs in order."""
        ...

    def prepare(self, batch: ForwardBatch) -> None:
        """Build per-batch metadata (``batch.lora_meta``) once, before the layers run."""
        ...
