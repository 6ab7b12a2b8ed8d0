"""Assemble an engine's parts from an EngineConfig: device, model, tokenizer,
adapter registry and pool, KV cache size, scheduler and runner.

Kept apart from ``llm_engine.py`` so the engine stays about the step, and so
benchmarks can build the same parts without the request bookkeeping.

With ``parallel.tensor_parallel_size`` N > 1 this process becomes rank 0: it
spawns ranks 1..N-1 (``inlaid.distributed.launcher``), builds its own shard
through the same ``inlaid.worker.rank.build_rank`` as the workers, and wraps its
runner in a ``TPDriverRunner`` that broadcasts each step. ``parts.tp_group``
must be shut down with the engine (``LLMEngine.shutdown``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from inlaid.config import EngineConfig
from inlaid.core.scheduler import Scheduler
from inlaid.engine.tokenizer import load_tokenizer
from inlaid.lora.pool import LoRAPool
from inlaid.lora.registry import AdapterRegistry
from inlaid.model.arch import ModelArch
from inlaid.model.loader import resolve_model_path
from inlaid.worker.model_runner import ModelRunner
from inlaid.worker.rank import build_rank, resolve_device, resolve_dtype

__all__ = ["EngineParts", "build_engine_parts", "resolve_device", "resolve_dtype"]

logger = logging.getLogger(__name__)


@dataclass
class EngineParts:
    device: torch.device
    dtype: torch.dtype
    arch: ModelArch
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase | None
    registry: AdapterRegistry
    pool: LoRAPool
    runner: ModelRunner
    scheduler: Scheduler
    num_blocks: int
    model_name: str
    model_dir: Path
    """Resolved checkpoint directory (converted GGUF, HF or GPTQ dir)."""
    max_model_len: int
    eos_token_id: int | None
    extra_eos_ids: tuple[int, ...]
    tp_group: Any = None
    """``inlaid.distributed.launcher.TPWorkerGroup`` when tensor_parallel_size > 1."""


def _eos_ids(tokenizer: PreTrainedTokenizerBase | None, arch: ModelArch) -> tuple[int | None, tuple[int, ...]]:
    primary = tokenizer.eos_token_id if tokenizer is not None else None
    ids = [t for t in arch.eos_token_ids if t is not None]
    if primary is None and ids:
        primary = ids[0]
    return primary, tuple(t for t in ids if t != primary)


def build_engine_parts(config: EngineConfig) -> EngineParts:
    """Load everything an engine needs; raises ValueError/FileNotFoundError with clear messages."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.model.dtype, device)
    registry_box: list[AdapterRegistry] = []
    group = _start_tp(config, device) if config.parallel.tensor_parallel_size > 1 else None
    try:
        tp = group.ctx if group is not None else None
        rank = build_rank(config, tp.device if tp else device, dtype, lambda n: registry_box[0].get(n), tp)
    except BaseException:
        if group is not None:
            group.shutdown(graceful=False)
        raise
    model, arch, pool, num_blocks = rank.model, rank.arch, rank.pool, rank.num_blocks
    registry = AdapterRegistry(arch.lora_module_shapes(), arch.num_layers, config.lora.max_lora_rank, pool.slot_modules)
    registry_box.append(registry)
    runner: Any = rank.runner
    if group is not None:
        from inlaid.distributed.launcher import TPDriverRunner

        runner = TPDriverRunner(rank.runner, group, registry.get)
    tokenizer = load_tokenizer(rank.model_dir)
    max_len = min(config.model.max_model_len or arch.max_position_embeddings, arch.max_position_embeddings)
    scheduler = Scheduler(
        config.scheduler, num_blocks, config.cache.block_size, config.lora.max_loras, max_model_len=max_len
    )
    eos, extra = _eos_ids(tokenizer, arch)
    logger.info("engine ready: %s on %s (%s), %d KV blocks of %d, TP=%d", arch.name, device, dtype, num_blocks,
                config.cache.block_size, config.parallel.tensor_parallel_size)
    return EngineParts(device, dtype, arch, model, tokenizer, registry, pool, runner, scheduler, num_blocks,
                       arch.name, rank.model_dir, max_len, eos, extra, group)


def _start_tp(config: EngineConfig, device: torch.device) -> Any:
    """Check the model splits over the ranks (before spawning anything), then start the worker group."""
    from inlaid.distributed.launcher import start_workers
    from inlaid.distributed.sharding import check_tp

    world = config.parallel.tensor_parallel_size
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(f"tensor_parallel_size={world} needs {world} GPUs; this host has "
                         f"{torch.cuda.device_count()}")
    check_tp(ModelArch.from_dir(resolve_model_path(config.model.model)), world)
    return start_workers(config, device)
