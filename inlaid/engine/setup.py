"""Assemble an engine's parts from an EngineConfig: device, model, tokenizer,
adapter registry and pool, KV cache size, scheduler and runner.

Kept apart from ``llm_engine.py`` so the engine stays about the step, and so
benchmarks can build the same parts without the request bookkeeping.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from inlaid.config import EngineConfig
from inlaid.core.scheduler import Scheduler
from inlaid.engine.tokenizer import load_tokenizer
from inlaid.lora.pool import LoRAPool
from inlaid.lora.registry import AdapterRegistry
from inlaid.model.arch import ModelArch
from inlaid.model.loader import load_model
from inlaid.worker.model_runner import ModelRunner, kv_bytes_per_block

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


def _num_blocks(config: EngineConfig, arch: ModelArch, device: torch.device, dtype: torch.dtype) -> int:
    cache = config.cache
    per_block = kv_bytes_per_block(arch, cache.block_size, dtype)
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
    model, arch, tok_dir = load_model(config.model, device, dtype)
    tokenizer = load_tokenizer(tok_dir)
    max_len = min(config.model.max_model_len or arch.max_position_embeddings, arch.max_position_embeddings)
    pool = LoRAPool(
        config.lora.max_loras, config.lora.max_lora_rank, arch.num_layers, arch.lora_module_shapes(), device, dtype
    )
    model.set_lora_hook(pool)
    registry = AdapterRegistry(arch.lora_module_shapes(), arch.num_layers, config.lora.max_lora_rank)
    num_blocks = _num_blocks(config, arch, device, dtype)
    runner = ModelRunner(model, arch, pool, registry.get, num_blocks, config.cache.block_size, device, dtype)
    scheduler = Scheduler(
        config.scheduler, num_blocks, config.cache.block_size, config.lora.max_loras, max_model_len=max_len
    )
    eos, extra = _eos_ids(tokenizer, arch)
    logger.info("engine ready: %s on %s (%s), %d KV blocks of %d", arch.name, device, dtype, num_blocks,
                config.cache.block_size)
    return EngineParts(device, dtype, arch, model, tokenizer, registry, pool, runner, scheduler, num_blocks,
                       arch.name, Path(tok_dir), max_len, eos, extra)
