"""Engine configuration: one frozen dataclass per area, composed into EngineConfig.

Invariants:
- Every field has a docstring (the attribute comment below it) and a sane default.
- Validation happens in ``__post_init__``; a bad value raises ``ValueError`` that
  names the field and what to fix.
- The CLI derives its flags from these dataclasses (see ``inlaid.cli``); nothing
  is declared twice.
- This module imports nothing from torch so that ``core/`` may use it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

POLICIES = ("fifo", "mlfq", "inlaid")
LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def default_cache_dir() -> Path:
    """Where converted checkpoints live (``$INLAID_CACHE`` or ``~/.cache/inlaid``)."""
    return Path(os.environ.get("INLAID_CACHE", Path.home() / ".cache" / "inlaid"))


@dataclass(frozen=True)
class ModelConfig:
    """What base model to load and how."""

    model: str = "default"
    """HF directory, .gguf file, GPTQ directory, or "default" (bundled SmolLM2-135M-Instruct)."""
    dtype: str = "auto"
    """"auto" (fp32 on CPU, bf16 on CUDA), "float32", "float16" or "bfloat16"."""
    load_format: Literal["auto", "dummy"] = "auto"
    """"dummy" builds random weights of the config's shapes (benchmarks without a checkpoint)."""
    max_model_len: int | None = None
    """Context limit in tokens; default: the model's max_position_embeddings."""
    dummy_seed: int = 0
    """Seed of the random weights when load_format is "dummy"."""
    gptq_dequant_cache: str = "auto"
    """GPTQ bases: keep the weights dequantized in the activation dtype ("on": fast steps, dense-weight memory;
    "off": unpack every step). "auto": on for CPU (no fused kernels there), off on CUDA."""
    requant_duty_cycle: float = 0.5
    """Background re-quantization of a GPTQ base (task addition): the worker's largest share of wall time, in
    (0, 1]; after each layer it sleeps (1/duty - 1) x the time it worked. 0.5 by default: on the CPU with the
    bundled model (benchmarks/results/dynamic.md) duty 1.0 cut serving throughput by 27-48% while it ran,
    duty 0.5 by 7.5%, for an addition about 1.2-2x longer. 1.0: as fast as possible."""
    requant_threads: int | None = None
    """Intra-op threads of the re-quantization worker thread (the engine's are unchanged); default: torch's."""

    def __post_init__(self) -> None:
        if not 0 < self.requant_duty_cycle <= 1:
            raise ValueError(f"requant_duty_cycle must be in (0, 1] (the worker's share of wall time), "
                             f"got {self.requant_duty_cycle}")
        if self.requant_threads is not None and self.requant_threads < 1:
            raise ValueError(f"requant_threads must be >= 1 (or unset for torch's default), got {self.requant_threads}")
        if self.gptq_dequant_cache not in ("auto", "on", "off"):
            raise ValueError(f"gptq_dequant_cache must be auto|on|off, got {self.gptq_dequant_cache!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be auto|float32|float16|bfloat16, got {self.dtype!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto|dummy, got {self.load_format!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache geometry."""

    block_size: int = 16
    """Tokens per KV block."""
    num_blocks: int | None = None
    """KV blocks to allocate; default: sized from memory_fraction of free device memory."""
    memory_fraction: float = 0.9
    """Fraction of free GPU memory for weights+KV when num_blocks is not given (CUDA only)."""
    cpu_kv_budget_gb: float = 1.0
    """KV cache size on CPU when num_blocks is not given."""

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if not 0.05 <= self.memory_fraction <= 0.99:
            raise ValueError(f"memory_fraction must be in [0.05, 0.99], got {self.memory_fraction}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits and the scheduling policy."""

    policy: str = "fifo"
    """"fifo" (S-LoRA), "mlfq" (FastServe skip-join MLFQ) or "inlaid" (SRTF + aging + grouping)."""
    max_num_seqs: int = 64
    """Most sequences in one step."""
    max_num_batched_tokens: int = 2048
    """Most tokens (prefill chunks + decodes) in one step."""
    max_adapters_per_step: int = 10
    """Task grouping cap β: distinct adapters in one step (inlaid policy)."""
    aging_s: float = 10.0
    """Requests waiting longer than this are promoted ahead of SRTF order (inlaid policy)."""
    max_queue_len: int = 1024
    """Waiting requests beyond this are rejected (the server answers 503)."""
    overlap_steps: str = "auto"
    """Launch the next decode step before reading the current one's tokens, so host work overlaps the device
    (steady decode only; ``LLMEngine``): "on", "off", or "auto" (on for a single CUDA device)."""

    def __post_init__(self) -> None:
        if self.overlap_steps not in ("auto", "on", "off"):
            raise ValueError(f"overlap_steps must be auto|on|off, got {self.overlap_steps!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_adapters_per_step", "max_queue_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.aging_s <= 0:
            raise ValueError(f"aging_s must be > 0, got {self.aging_s}")


@dataclass(frozen=True)
class LoRAConfig:
    """Adapter limits: host memory holds every adapter, the device a fixed number of slots."""

    max_lora_rank: int = 64
    """Largest adapter rank accepted (slots are allocated at this rank)."""
    max_loras: int = 8
    """Adapter slots resident on the device at once."""
    lora_target_modules: str = "all"
    """Projections each device slot holds, comma-separated (e.g. "q_proj,v_proj"), or "all"; adapters that target others are refused."""

    def __post_init__(self) -> None:
        names = [n.strip() for n in self.lora_target_modules.split(",") if n.strip()]
        if self.lora_target_modules.strip().lower() != "all" and (
                not names or any(n not in LORA_PROJECTIONS for n in names)):
            raise ValueError(f"lora_target_modules must be 'all' or a comma-separated subset of "
                             f"{','.join(LORA_PROJECTIONS)}, got {self.lora_target_modules!r}")
        if not 1 <= self.max_lora_rank <= 256:
            raise ValueError(f"max_lora_rank must be in [1, 256], got {self.max_lora_rank}")
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism over torch.distributed (one process per rank; rank 0 is the engine)."""

    tensor_parallel_size: int = 1
    """Ranks that shard the model (column/row-parallel linears, sharded heads and KV cache); 1 = no TP."""
    distributed_timeout_s: float = 120.0
    """Timeout of every collective (and of start-up): a dead or stuck rank makes the engine raise after this."""

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.distributed_timeout_s <= 0:
            raise ValueError(f"distributed_timeout_s must be > 0, got {self.distributed_timeout_s}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs, composed from the per-area configs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: str = "auto"
    """"auto" (cuda if available, else cpu), "cpu" or "cuda[:N]"."""

    def __post_init__(self) -> None:
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"device must be auto|cpu|cuda[:N], got {self.device!r}")

    @staticmethod
    def from_kwargs(**kwargs: object) -> "EngineConfig":
        """Build from flat keyword arguments (``LLM(model=..., block_size=...)``).

        Each key is routed to the area dataclass that declares it; an unknown key
        raises ``TypeError`` naming it.
        """
        areas = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig, "lora": LoRAConfig,
                 "parallel": ParallelConfig}
        parts: dict[str, dict[str, object]] = {k: {} for k in areas}
        top: dict[str, object] = {}
        for key, value in kwargs.items():
            if key == "device":
                top[key] = value
                continue
            owner = next((a for a, cls in areas.items() if key in {f.name for f in dataclasses.fields(cls)}), None)
            if owner is None:
                raise TypeError(f"unknown engine option {key!r}")
            parts[owner][key] = value
        return EngineConfig(**{a: areas[a](**parts[a]) for a in areas}, **top)  # type: ignore[arg-type]
