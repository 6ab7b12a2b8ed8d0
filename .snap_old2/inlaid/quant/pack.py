"""The standard GPTQ tensor layout and checkpoint directory: write, read, validate.

Owns the *writing* side of the layout and the checkpoint files; the reading
side (bit unpacking, dequantize) is ``inlaid.kernels.gptq_dequant``, whose
docstring is the layout's specification (AutoGPTQ / transformers-optimum v1
``"gptq"`` format; 2- and 3-bit use the same little-endian bit stream, 3-bit
being AutoGPTQ's 32-values-in-3-words packing).

Per quantized linear ``name``: ``name.qweight`` int32 ``[I*bits/32, O]``,
``name.qzeros`` int32 ``[G, O*bits/32]`` (``zero - 1``), ``name.scales`` fp16
``[G, O]``, ``name.g_idx`` int32 ``[I]`` and optionally ``name.bias``.

A checkpoint directory holds ``model.safetensors`` (or shards with
``model.safetensors.index.json`` when written by others), ``quantize_config.json``
and ``config.json`` with a transformers ``quantization_config`` entry. Writes
are atomic: files go to a temporary sibling directory first, then are renamed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from inlaid.kernels.gptq_dequant import dequantize_gptq, pack_geometry, unpack_rows
from inlaid.quant.gptq import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, QuantResult

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
QUANT_CONFIG_NAME = "quantize_config.json"
CONFIG_NAME = "config.json"
LAYER_KEYS = ("qweight", "qzeros", "scales", "g_idx")


class CheckpointError(ValueError):
    """A quantized checkpoint is missing, corrupt, truncated or inconsistent."""


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[R, C]`` (values in ``[0, 2**bits)``) along dim 0 into int32 ``[R*bits/32, C]``."""
    vals, words = pack_geometry(bits)
    if codes.dim() != 2 or codes.shape[0] % vals:
        raise ValueError(f"{bits}-bit packing needs a 2-D tensor with rows divisible by {vals}, got {tuple(codes.shape)}")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) for {bits}-bit packing")
    runs = c.reshape(-1, vals, c.shape[1])
    out = torch.zeros(runs.shape[0], words, c.shape[1], dtype=torch.int64, device=c.device)
    for j in range(vals):
        w, s = divmod(bits * j, 32)
        out[:, w] |= (runs[:, j] << s) & 0xFFFFFFFF
        if s + bits > 32:
            out[:, w + 1] |= runs[:, j] >> (32 - s)
    out = out.reshape(-1, c.shape[1])
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def pack(result: QuantResult) -> dict[str, torch.Tensor]:
    """The four checkpoint tensors of one quantized linear (CPU tensors)."""
    zeros = result.zeros.to(torch.int64)
    if int(zeros.min()) < 1 or int(zeros.max()) > 2**result.bits - 1:
        raise ValueError(f"zero points must lie in [1, {2**result.bits - 1}] for the v1 (zero-1) format")
    scales16 = result.scales.to(torch.float16)
    if not torch.equal(scales16.to(torch.float32), result.scales.to(torch.float32)):
        raise ValueError("scales are not exactly representable in fp16; quantize with inlaid.quant.gptq")
    # Packed on the result's device, then moved to CPU: the H200 quality run packs 16 models x 210 linears in
    # 5-11 s per config this way (benchmarks/results/quality.md timings); packing on the host took > 11 min.
    return {
        "qweight": pack_rows(result.qweight.t(), result.bits).cpu(),
        "qzeros": pack_rows((zeros - 1).t().contiguous(), result.bits).t().contiguous().cpu(),
        "scales": scales16.cpu().contiguous(),
        "g_idx": result.g_idx.to(torch.int32).cpu().contiguous(),
    }


def unpack(
    tensors: Mapping[str, torch.Tensor], bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``pack``: ``(codes uint8 [O, I], scales [G, O], zeros int32 [G, O], g_idx int32 [I])``."""
    validate_layer(tensors, bits, group_size, name="layer")
    codes = unpack_rows(tensors["qweight"], bits).t().to(torch.uint8)
    zeros = unpack_rows(tensors["qzeros"].t().contiguous(), bits).t() + 1
    return codes, tensors["scales"], zeros.to(torch.int32), tensors["g_idx"].to(torch.int32)


def dequantize(tensors: Mapping[str, torch.Tensor], bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantized weight ``[O, I]`` (``nn.Linear`` orientation) in ``dtype``; exact in fp32."""
    scales = tensors["scales"].to(dtype)
    return dequantize_gptq(tensors["qweight"], tensors["qzeros"], scales, tensors["g_idx"], bits).t()


def validate_layer(tensors: Mapping[str, torch.Tensor], bits: int, group_size: int, name: str) -> None:
    """Check presence, dtypes and shapes of one layer's tensors; raise ``CheckpointError``."""
    missing = [k for k in LAYER_KEYS if k not in tensors]
    if missing:
        raise CheckpointError(f"{name}: missing tensors {missing}")
    qw, qz, sc, gi = (tensors[k] for k in LAYER_KEYS)
    vals, words = pack_geometry(bits)
    if qw.dtype != torch.int32 or qz.dtype != torch.int32 or qw.dim() != 2 or qz.dim() != 2:
        raise CheckpointError(f"{name}: qweight/qzeros must be 2-D int32, got {qw.dtype}/{qz.dtype}")
    if not sc.is_floating_point() or sc.dim() != 2:
        raise CheckpointError(f"{name}: scales must be 2-D floating point, got {sc.dtype} {tuple(sc.shape)}")
    if gi.dtype not in (torch.int32, torch.int64) or gi.dim() != 1:
        raise CheckpointError(f"{name}: g_idx must be 1-D int32, got {gi.dtype} {tuple(gi.shape)}")
    if qw.shape[0] % words or qz.shape[1] % words:
        raise CheckpointError(f"{name}: packed shapes {tuple(qw.shape)}, {tuple(qz.shape)} do not fit {bits}-bit packing")
    n_in, n_out = qw.shape[0] // words * vals, qw.shape[1]
    n_groups = 1 if group_size == -1 else -(-n_in // group_size)
    want = {"scales": (n_groups, n_out), "qzeros": (n_groups, n_out // vals * words), "g_idx": (n_in,)}
    for key, shape in want.items():
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(f"{name}: {key} has shape {tuple(tensors[key].shape)}, expected {shape} "
                                  f"for in={n_in}, out={n_out}, bits={bits}, group_size={group_size}")  # fmt: skip
    if gi.numel() and (int(gi.min()) < 0 or int(gi.max()) >= n_groups):
        raise CheckpointError(f"{name}: g_idx values outside [0, {n_groups})")


def quantization_config(bits: int, group_size: int, sym: bool, desc_act: bool, static_groups: bool,
                        damp_percent: float = 0.01) -> dict[str, Any]:  # fmt: skip
    """The ``quantize_config.json`` / transformers ``quantization_config`` dict for what we write."""
    if bits not in SUPPORTED_BITS or group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"unsupported bits={bits} / group_size={group_size}; "
                         f"use bits in {SUPPORTED_BITS}, group_size in {SUPPORTED_GROUP_SIZES}")  # fmt: skip
    return _config_dict(bits, group_size, sym, desc_act, static_groups, damp_percent)


def _config_dict(bits: int, group_size: int, sym: bool, desc_act: bool, static_groups: bool,
                 damp_percent: float) -> dict[str, Any]:  # fmt: skip
    return {
        "quant_method": "gptq", "checkpoint_format": "gptq", "bits": bits, "group_size": group_size,
        "desc_act": desc_act, "sym": sym, "static_groups": static_groups, "damp_percent": damp_percent,
        "true_sequential": True,
    }  # fmt: skip


@dataclass
class QuantizedCheckpoint:
    """A loaded checkpoint: normalized quant config, model config, per-layer tensors, everything else."""

    quantize_config: dict[str, Any]
    config: dict[str, Any]
    layers: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    other_tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def bits(self) -> int:
        return int(self.quantize_config["bits"])

    @property
    def group_size(self) -> int:
        return int(self.quantize_config["group_size"])


def save_quantized_checkpoint(
    directory: str | os.PathLike,
    tensors_by_layer_name: Mapping[str, Mapping[str, torch.Tensor]],
    quantize_config: Mapping[str, Any],
    other_tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
) -> Path:
    """Write a GPTQ checkpoint directory atomically; returns its path."""
    qc = _normalize_quant_config(dict(quantize_config), source="quantize_config")
    flat: dict[str, torch.Tensor] = {}
    for name, layer in tensors_by_layer_name.items():
        validate_layer(layer, qc["bits"], qc["group_size"], name)
        for key, t in layer.items():
            flat[f"{name}.{key}"] = t
    for key, t in other_tensors.items():
        if key in flat:
            raise ValueError(f"tensor name {key!r} is both a quantized-layer tensor and an other tensor")
        flat[key] = t
    flat = _unshared_cpu(flat)
    cfg = dict(config)
    cfg["quantization_config"] = dict(qc)
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_file(flat, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "quant_method": "gptq"})
        (tmp / QUANT_CONFIG_NAME).write_text(json.dumps(qc, indent=2))
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
        _move_into(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote GPTQ checkpoint %s (%d quantized layers)", target, len(tensors_by_layer_name))
    return target


def _unshared_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no two tensors sharing storage (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out = {}
    for key, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[key] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def _move_into(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    for name in (WEIGHTS_NAME, QUANT_CONFIG_NAME, CONFIG_NAME):
        os.replace(tmp / name, target / name)
    stale = target / INDEX_NAME
    if stale.exists():
        stale.unlink()


def _normalize_quant_config(qc: dict[str, Any], source: str) -> dict[str, Any]:
    fmt = qc.get("checkpoint_format", "gptq")
    if qc.get("quant_method", "gptq") != "gptq" or fmt != "gptq":
        raise CheckpointError(f"{source}: only quant_method 'gptq' with checkpoint_format 'gptq' (v1) is "
                              f"supported, got {qc.get('quant_method')!r}/{fmt!r}")  # fmt: skip
    try:
        bits, gs = int(qc["bits"]), int(qc["group_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: needs integer 'bits' and 'group_size' ({e})") from e
    if bits not in SUPPORTED_BITS:
        raise CheckpointError(f"{source}: bits={bits} unsupported; use one of {SUPPORTED_BITS}")
    if gs != -1 and gs <= 0:
        raise CheckpointError(f"{source}: group_size={gs} must be -1 or positive")
    # any positive group size others wrote is readable; we only write SUPPORTED_GROUP_SIZES
    return _config_dict(bits, gs, bool(qc.get("sym", True)), bool(qc.get("desc_act", False)),
                        bool(qc.get("static_groups", False)), float(qc.get("damp_percent", 0.01)))  # fmt: skip


def load_quantized_checkpoint(directory: str | os.PathLike) -> QuantizedCheckpoint:
    """Load and validate a GPTQ checkpoint directory (ours or another tool's)."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory")
    config = _read_json(d / CONFIG_NAME) if (d / CONFIG_NAME).exists() else {}
    if (d / QUANT_CONFIG_NAME).exists():
        qc_raw, src = _read_json(d / QUANT_CONFIG_NAME), str(d / QUANT_CONFIG_NAME)
    elif "quantization_config" in config:
        qc_raw, src = config["quantization_config"], str(d / CONFIG_NAME)
    else:
        raise CheckpointError(f"{d}: no {QUANT_CONFIG_NAME} and no quantization_config in {CONFIG_NAME}")
    qc = _normalize_quant_config(dict(qc_raw), source=src)
    tensors = _read_tensors(d)
    ckpt = QuantizedCheckpoint(quantize_config=qc, config=config)
    names = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    if not names:
        raise CheckpointError(f"{d}: no '*.qweight' tensors; not a GPTQ checkpoint")
    for name in names:
        layer = {k: tensors.pop(f"{name}.{k}") for k in (*LAYER_KEYS, "bias") if f"{name}.{k}" in tensors}
        if "g_idx" not in layer and "qweight" in layer:  # old checkpoints omit g_idx
            n_in = layer["qweight"].shape[0] // pack_geometry(qc["bits"])[1] * pack_geometry(qc["bits"])[0]
            layer["g_idx"] = _default_g_idx(n_in, qc["group_size"])
        validate_layer(layer, qc["bits"], qc["group_size"], name)
        ckpt.layers[name] = layer
    ckpt.other_tensors = tensors
    return ckpt


def _default_g_idx(n_in: int, group_size: int) -> torch.Tensor:
    gs = n_in if group_size == -1 else group_size
    return (torch.arange(n_in) // gs).to(torch.int32)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _read_tensors(d: Path) -> dict[str, torch.Tensor]:
    if (d / WEIGHTS_NAME).exists():
        files = [d / WEIGHTS_NAME]
    elif (d / INDEX_NAME).exists():
        weight_map = _read_json(d / INDEX_NAME).get("weight_map", {})
        files = [d / f for f in sorted(set(weight_map.values()))]
    else:
        raise CheckpointError(f"{d}: no {WEIGHTS_NAME} or {INDEX_NAME}")
    out: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    out[key] = f.get_tensor(key)
        except Exception as e:  # safetensors raises its own error types for bad headers/sizes
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from e
    return out
