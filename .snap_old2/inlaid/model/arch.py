"""ModelArch: the shape and numerics of a Llama-family model, parsed from HF config.json.

Owns the translation from Hugging Face config fields (both the transformers<5
layout with ``rope_theta``/``rope_scaling`` and the 5.x ``rope_parameters``
layout) into one frozen description used by the model, the KV cache, the LoRA
pool and the quantizer. Imports nothing from torch.

Supported: Llama (and SmolLM, which is Llama), Mistral (sliding window),
Qwen2 (q/k/v bias). Anything else raises ``ValueError`` naming the
architecture and the supported list. RoPE: default, "linear", "llama3".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (transformers' rope_type semantics)."""

    rope_type: str
    """"linear" or "llama3"."""
    factor: float
    low_freq_factor: float | None = None
    """llama3 only."""
    high_freq_factor: float | None = None
    """llama3 only."""
    original_max_position_embeddings: int | None = None
    """llama3 only."""


@dataclass(frozen=True)
class ModelArch:
    """Everything about a base model's shapes that inlaid needs (no weights)."""

    name: str
    architecture: str
    """HF class name, e.g. "LlamaForCausalLM"."""
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool
    qkv_bias: bool
    """Bias on q/k/v projections (Qwen2 always; Llama with attention_bias)."""
    o_bias: bool
    """Bias on o_proj (Llama attention_bias only)."""
    mlp_bias: bool
    max_position_embeddings: int
    sliding_windows: tuple[int | None, ...]
    """Per layer: the attention window in tokens, or None for full attention."""
    eos_token_ids: tuple[int, ...]
    """From config.json and generation_config.json, deduplicated, config's first."""

    @property
    def attention_bias(self) -> bool:
        """True when any attention projection has a bias."""
        return self.qkv_bias or self.o_bias

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def lora_module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each LoRA-targetable projection."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @classmethod
    def from_dir(cls, path: str | Path, name: str | None = None) -> "ModelArch":
        """Parse ``path/config.json`` (+ ``generation_config.json`` when present)."""
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"no config.json in {path}: expected a Hugging Face model directory")
        config = json.loads(cfg_file.read_text())
        gen_file = path / "generation_config.json"
        gen = json.loads(gen_file.read_text()) if gen_file.is_file() else None
        return cls.from_dict(config, gen, name=name or config.get("_name_or_path") or path.name)

    @classmethod
    def from_dict(cls, config: dict[str, Any], generation_config: dict[str, Any] | None = None,
                  name: str | None = None) -> "ModelArch":
        """Parse an HF config dict; raises ValueError for anything unsupported."""
        architecture = _architecture(config)
        hidden, heads = _req(config, "hidden_size"), _req(config, "num_attention_heads")
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or _divide(hidden, heads, "hidden_size", "num_attention_heads")
        _divide(heads, kv_heads, "num_attention_heads", "num_key_value_heads")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only 'silu')")
        theta, scaling = _rope(config)
        model_type = SUPPORTED_ARCHITECTURES[architecture]
        attention_bias = bool(config.get("attention_bias", False))
        num_layers = _req(config, "num_hidden_layers")
        return cls(
            name=name or model_type, architecture=architecture, model_type=model_type,
            vocab_size=_req(config, "vocab_size"), hidden_size=hidden,
            intermediate_size=_req(config, "intermediate_size"), num_layers=num_layers,
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type == "llama" and attention_bias,
            mlp_bias=bool(config.get("mlp_bias", False)) if model_type == "llama" else False,
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            sliding_windows=_sliding_windows(config, model_type, num_layers),
            eos_token_ids=_eos_ids(config, generation_config),
        )


def _architecture(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
    if not archs and config.get("model_type") in by_type:
        return by_type[config["model_type"]]
    found = archs or [config.get("model_type")]
    raise ValueError(
        f"unsupported model architecture {found}; supported: {sorted(SUPPORTED_ARCHITECTURES)} "
        "(model_type llama/mistral/qwen2; SmolLM is llama)"
    )


def _req(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"config.json field {key!r} must be a positive int, got {value!r}")
    return value


def _divide(a: int, b: int, a_name: str, b_name: str) -> int:
    if a % b:
        raise ValueError(f"{a_name} ({a}) must be divisible by {b_name} ({b})")
    return a // b


def _rope(config: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling``."""
    params = dict(config.get("rope_parameters") or {})
    legacy = config.get("rope_scaling") or {}
    params = {**legacy, **params} if params else dict(legacy)
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    if rope_type == "default":
        return theta, None
    if "factor" not in params:
        raise ValueError(f"rope scaling {rope_type!r} needs a 'factor'")
    if rope_type == "linear":
        return theta, RopeScaling("linear", float(params["factor"]))
    missing = [k for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings") if k not in params]
    if missing:
        raise ValueError(f"llama3 rope scaling is missing {missing}")
    return theta, RopeScaling(
        "llama3", float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"]),
        int(params["original_max_position_embeddings"]),
    )


def _sliding_windows(config: dict[str, Any], model_type: str, num_layers: int) -> tuple[int | None, ...]:
    window = config.get("sliding_window")
    if model_type == "llama" or window is None:
        return (None,) * num_layers
    if model_type == "mistral":
        return (int(window),) * num_layers
    layer_types = config.get("layer_types")
    if layer_types is None:  # qwen2 before transformers 5
        if not config.get("use_sliding_window", False):
            return (None,) * num_layers
        first = int(config.get("max_window_layers", num_layers))
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if len(layer_types) != num_layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
    return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)


def _eos_ids(config: dict[str, Any], generation_config: dict[str, Any] | None) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (config, generation_config or {}):
        value = source.get("eos_token_id")
        for tok in value if isinstance(value, list) else [value]:
            if isinstance(tok, int) and tok not in ids:
                ids.append(tok)
    return tuple(ids)
