"""PEFT LoRA adapter directories -> host-memory ``LoRAAdapter`` (load and validate).

Owns reading ``adapter_config.json`` + ``adapter_model.safetensors`` (or
``adapter_model.bin``) as written by PEFT's ``save_pretrained``, and checking an
adapter against a base model's projection shapes and the configured max rank.

Invariants of a loaded ``LoRAAdapter``:
- ``weights[(layer, module)]`` holds ``a`` [r, in] and ``b`` [out, r] (the file's
  dtype, contiguous, CPU) with ``r = a.shape[0] = b.shape[1]`` equal to the
  configured rank (``r`` or its ``rank_pattern`` override) of that module;
- ``scaling`` of each entry is PEFT's: ``alpha / r`` or, with ``use_rslora``,
  ``alpha / sqrt(r)``, where alpha/r honour ``alpha_pattern``/``rank_pattern``;
- options that change the math beyond ``x @ Aᵀ @ Bᵀ · scaling`` (DoRA, biases,
  modules_to_save, embedding/lm_head targets, ...) are rejected, never ignored.
Every failure raises ``AdapterError`` (a ``ValueError``) naming the file,
module and shapes involved.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inlaid.lora.errors import AdapterError, IncompatibleAdapterError

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"

_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?"
    r"(?P<mkey>(?:.*\.)?layers\.(?P<layer>\d+)\.(?:.*\.)?(?P<module>[A-Za-z0-9_]+))"
    r"\.lora_(?P<ab>[AB])(?:\.default)?\.weight$"
)
_NON_LAYER_TARGETS = ("lm_head", "embed_tokens", "wte", "embed_out", "word_embeddings")


@dataclass(frozen=True)
class LoRAWeights:
    """One (layer, module) of an adapter: delta = scaling · (x @ aᵀ) @ bᵀ."""

    a: torch.Tensor
    """[rank, in_features]"""
    b: torch.Tensor
    """[out_features, rank]"""
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class LoRAAdapter:
    """A PEFT LoRA adapter held in host memory."""

    name: str
    path: str
    rank: int
    """Largest rank over all modules (what a device slot must hold)."""
    alpha: float
    """``lora_alpha`` of the config (per-module overrides are in ``weights``)."""
    use_rslora: bool
    scaling: float
    """Default scaling of the config (``alpha/r`` or ``alpha/sqrt(r)``)."""
    target_modules: tuple[str, ...]
    """Module names that carry weights (sorted), e.g. ("q_proj", "v_proj")."""
    weights: Mapping[tuple[int, str], LoRAWeights] = field(repr=False)
    base_model_name_or_path: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(w.a.numel() * w.a.element_size() + w.b.numel() * w.b.element_size() for w in self.weights.values())

    @property
    def num_layers(self) -> int:
        """1 + the highest layer index that has weights."""
        return 1 + max(layer for layer, _ in self.weights)


def _compute_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _pattern_value(patterns: Mapping[str, Any], module_key: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern key matching a suffix of ``module_key``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_key):
            return patterns[key]
    return default


def _read_config(root: Path) -> dict[str, Any]:
    if not root.exists():
        raise AdapterError(f"adapter directory {root} does not exist")
    if not root.is_dir():
        raise AdapterError(f"adapter path {root} is not a directory (expected a PEFT adapter directory)")
    cfg_path = root / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterError(f"{root} is not a PEFT adapter directory: {CONFIG_NAME} is missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _targets_non_layer(target_modules: Any) -> str | None:
    """Return the offending name if target_modules includes lm_head or an embedding."""
    if isinstance(target_modules, str):
        probes = [f"model.{n}" for n in _NON_LAYER_TARGETS] + list(_NON_LAYER_TARGETS)
        return next((p for p in probes if re.fullmatch(target_modules, p)), None)
    for t in target_modules or []:
        if str(t).split(".")[-1] in _NON_LAYER_TARGETS:
            return str(t)
    return None


def _unsupported_options(cfg: Mapping[str, Any]) -> list[str]:
    """Options whose effect this engine does not implement; each entry explains one."""
    bad = []
    if cfg.get("use_dora"):
        bad.append("DoRA (use_dora=true) is not supported; use a plain LoRA adapter (use_dora=false)")
    if cfg.get("modules_to_save"):
        bad.append(f"modules_to_save={cfg['modules_to_save']!r} is not supported (fully trained modules)")
    if cfg.get("bias", "none") != "none":
        bad.append(f"bias={cfg['bias']!r} is not supported; only bias='none'")
    if cfg.get("lora_bias"):
        bad.append("lora_bias=true is not supported")
    if cfg.get("fan_in_fan_out"):
        bad.append("fan_in_fan_out=true (Conv1D layout) is not supported")
    for key in ("layer_replication", "trainable_token_indices", "target_parameters", "alora_invocation_tokens"):
        if cfg.get(key):
            bad.append(f"{key}={cfg[key]!r} is not supported")
    for key in ("use_qalora", "use_bdlora"):
        if cfg.get(key):
            bad.append(f"{key}=true is not supported")
    offending = _targets_non_layer(cfg.get("target_modules"))
    if offending is not None:
        bad.append(f"target_modules includes {offending!r}: lm_head/embedding targets are not supported")
    return bad


def _check_config(cfg: Mapping[str, Any], cfg_path: Path) -> None:
    peft_type = cfg.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type is {peft_type!r}; only LORA adapters are supported")
    bad = _unsupported_options(cfg)
    if bad:
        raise AdapterError(f"{cfg_path}: unsupported adapter options: " + "; ".join(bad))
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterError(f"{cfg_path}: 'r' must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise AdapterError(f"{cfg_path}: 'lora_alpha' must be a number, got {alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise AdapterError(f"{cfg_path}: {key!r} must be an object mapping module patterns to values")


def _read_tensors(root: Path) -> tuple[dict[str, torch.Tensor], Path]:
    st, binf = root / SAFETENSORS_NAME, root / BIN_NAME
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st), device="cpu"), st
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise AdapterError(f"{st} is not a readable safetensors file (corrupt or truncated?): {exc}") from exc
    if binf.is_file():
        try:
            state = torch.load(str(binf), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types (pickle, zip, runtime) for bad files
            raise AdapterError(f"{binf} could not be read with torch.load(weights_only=True): {exc}") from exc
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterError(f"{binf} must hold a dict of tensors")
        return state, binf
    raise AdapterError(f"{root} has no {SAFETENSORS_NAME} or {BIN_NAME}")


def _explain_bad_key(key: str, file: Path) -> AdapterError:
    if "lora_magnitude_vector" in key:
        return AdapterError(f"{file}: tensor {key!r} is a DoRA magnitude; DoRA is not supported")
    if "lora_embedding" in key or any(n in key for n in _NON_LAYER_TARGETS):
        return AdapterError(f"{file}: tensor {key!r} targets lm_head/embedding, which is not supported")
    if ".lora_" in key and key.endswith(".bias"):
        return AdapterError(f"{file}: tensor {key!r} is a LoRA bias; lora_bias is not supported")
    return AdapterError(f"{file}: unrecognized tensor {key!r} (expected PEFT keys like "
                        "'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight')")


def _group_tensors(tensors: Mapping[str, torch.Tensor], file: Path) -> dict[tuple[int, str], dict[str, Any]]:
    """Pair lora_A/lora_B tensors by (layer, module); also keep the module key for patterns."""
    groups: dict[tuple[int, str], dict[str, Any]] = {}
    for key, tensor in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            raise _explain_bad_key(key, file)
        entry = groups.setdefault((int(m["layer"]), m["module"]), {"mkey": m["mkey"]})
        if m["ab"] in entry:
            raise AdapterError(f"{file}: two tensors for {m['mkey']}.lora_{m['ab']} (e.g. {key!r})")
        if tensor.dim() != 2 or not tensor.is_floating_point():
            raise AdapterError(f"{file}: {key!r} must be a 2-D float tensor, got {tensor.dtype} {tuple(tensor.shape)}")
        entry[m["ab"]] = tensor
    for (layer, module), entry in groups.items():
        missing = [ab for ab in "AB" if ab not in entry]
        if missing:
            raise AdapterError(f"{file}: layer {layer} {module} has no lora_{missing[0]} weight")
    if not groups:
        raise AdapterError(f"{file} contains no LoRA weights")
    return groups


def _build_weights(entry: Mapping[str, Any], cfg: Mapping[str, Any], file: Path) -> LoRAWeights:
    a, b, mkey = entry["A"], entry["B"], entry["mkey"]
    rank = int(_pattern_value(cfg.get("rank_pattern") or {}, mkey, cfg["r"]))
    alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, mkey, cfg["lora_alpha"]))
    if a.shape[0] != rank or b.shape[1] != rank:
        raise AdapterError(
            f"{file}: {mkey}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not match the configured "
            f"rank {rank} (r / rank_pattern in {CONFIG_NAME})"
        )
    scaling = _compute_scaling(alpha, rank, bool(cfg.get("use_rslora", False)))
    return LoRAWeights(a=a.contiguous(), b=b.contiguous(), scaling=scaling)


def load_adapter(name: str, path: str | Path) -> LoRAAdapter:
    """Read a PEFT LoRA directory into host memory; raises ``AdapterError`` on anything unusable."""
    if not isinstance(name, str) or not name:
        raise AdapterError(f"adapter name must be a non-empty string, got {name!r}")
    root = Path(path).expanduser()
    cfg = _read_config(root)
    _check_config(cfg, root / CONFIG_NAME)
    tensors, file = _read_tensors(root)
    groups = _group_tensors(tensors, file)
    weights = {k: _build_weights(groups[k], cfg, file) for k in sorted(groups)}
    use_rslora = bool(cfg.get("use_rslora", False))
    adapter = LoRAAdapter(
        name=name,
        path=str(root),
        rank=max(w.rank for w in weights.values()),
        alpha=float(cfg["lora_alpha"]),
        use_rslora=use_rslora,
        scaling=_compute_scaling(float(cfg["lora_alpha"]), int(cfg["r"]), use_rslora),
        target_modules=tuple(sorted({m for _, m in weights})),
        weights=weights,
        base_model_name_or_path=cfg.get("base_model_name_or_path"),
    )
    logger.info("loaded adapter %r from %s: rank %d, modules %s, %d bytes", name, file, adapter.rank,
                ",".join(adapter.target_modules), adapter.total_bytes)
    return adapter


def validate_adapter(
    adapter: LoRAAdapter,
    module_shapes: Mapping[str, tuple[int, int]],
    num_layers: int,
    max_rank: int,
) -> None:
    """Check an adapter against the base model; raises ``IncompatibleAdapterError`` naming the mismatch.

    ``module_shapes`` maps a projection name to the base's ``(in_features, out_features)``.
    """
    if adapter.rank > max_rank:
        raise IncompatibleAdapterError(
            f"adapter {adapter.name!r}: rank {adapter.rank} exceeds max_lora_rank {max_rank}; "
            f"restart with --max-lora-rank {adapter.rank}"
        )
    for (layer, module), w in adapter.weights.items():
        if module not in module_shapes:
            raise IncompatibleAdapterError(
                f"adapter {adapter.name!r}: module {module!r} (layer {layer}) is not a projection of the base "
                f"model (known: {', '.join(module_shapes)})"
            )
        if layer >= num_layers:
            raise IncompatibleAdapterError(
                f"adapter {adapter.name!r}: has weights for layer {layer} but the base model has {num_layers} "
                f"layers (0..{num_layers - 1}); it was trained for another base"
            )
        d_in, d_out = module_shapes[module]
        if w.a.shape[1] != d_in or w.b.shape[0] != d_out:
            raise IncompatibleAdapterError(
                f"adapter {adapter.name!r}: layer {layer} {module}: the base expects in={d_in}, out={d_out} "
                f"(lora_A [r, {d_in}], lora_B [{d_out}, r]) but the adapter has lora_A {tuple(w.a.shape)}, "
                f"lora_B {tuple(w.b.shape)}; it was trained for another base model"
            )


def check_fits(adapter: LoRAAdapter, slot_modules: Sequence[str], max_rank: int) -> None:
    """Raise ``IncompatibleAdapterError`` when ``adapter`` needs a projection or rank the slots were not sized for."""
    missing = sorted(set(adapter.target_modules) - set(slot_modules))
    if missing:
        raise IncompatibleAdapterError(
            f"adapter {adapter.name!r} targets {', '.join(missing)}, but the device adapter slots hold only "
            f"{', '.join(slot_modules)}; restart with --lora-target-modules including "
            f"{', '.join(missing)} (or 'all')"
        )
    if adapter.rank > max_rank:
        raise IncompatibleAdapterError(
            f"adapter {adapter.name!r}: rank {adapter.rank} exceeds max_lora_rank {max_rank}; "
            f"restart with --max-lora-rank {adapter.rank}"
        )
