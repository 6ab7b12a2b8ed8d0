"""Build one rank's device state (model shard, LoRA pool, KV caches, ModelRunner) from an EngineConfig.

Shared by the engine process (rank 0, through ``inlaid.engine.setup``) and the
tensor-parallel worker processes (``inlaid.distributed.launcher``), so every
rank builds the same thing from the same config. Imports no tokenizer code (the
workers do not need it).

Invariant: under TP every rank ends with the same ``num_blocks`` (the minimum
over ranks), so the scheduler's block ids are valid everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from inlaid.config import EngineConfig
from inlaid.distributed.context import TPContext
from inlaid.distributed.sharding import lora_shards
from inlaid.lora.adapter import LoRAAdapter
from inlaid.lora.pool import LoRAPool
from inlaid.model.arch import ModelArch
from inlaid.model.loader import load_model
from inlaid.worker.model_runner import ModelRunner, kv_bytes_per_block


@dataclass
class RankParts:
    model: torch.nn.Module
    arch: ModelArch
    model_dir: Path
    pool: LoRAPool
    runner: ModelRunner
    num_blocks: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def num_kv_blocks(config: EngineConfig, arch: ModelArch, device: torch.device, dtype: torch.dtype,
                  tp_size: int = 1) -> int:
    """KV blocks that fit: ``cache.num_blocks``, else a share of free CUDA memory / the CPU budget."""
    cache = config.cache
    per_block = kv_bytes_per_block(arch, cache.block_size, dtype, tp_size)
    if cache.num_blocks is not None:
        return cache.num_blocks
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = free * cache.memory_fraction
    else:
        budget = cache.cpu_kv_budget_gb * 1024**3
    blocks = int(budget // per_block)
    if blocks < 1:
        raise ValueError("not enough memory for a single KV block; lower max_model_len or use a smaller model")
    return blocks


def build_rank(config: EngineConfig, device: torch.device, dtype: torch.dtype,
               get_adapter: Callable[[str], LoRAAdapter], tp: TPContext | None = None) -> RankParts:
    """Load this rank's model shard, LoRA pool and runner (KV blocks agreed over ranks under TP)."""
    tp = tp if tp is not None else TPContext.single(device)
    model, arch, model_dir = load_model(config.model, device, dtype, tp=tp)
    shards = lora_shards(arch, tp.rank, tp.world_size) if tp.world_size > 1 else None
    pool = LoRAPool(config.lora.max_loras, config.lora.max_lora_rank, arch.num_layers, arch.lora_module_shapes(),
                    device, dtype, shards=shards, target_modules=config.lora.lora_target_modules)
    model.set_lora_hook(pool)
    num_blocks = tp.min_int(num_kv_blocks(config, arch, device, dtype, tp.world_size))
    runner = ModelRunner(model, arch, pool, get_adapter, num_blocks, config.cache.block_size, device, dtype, tp=tp)
    return RankParts(model, arch, Path(model_dir), pool, runner, num_blocks)
