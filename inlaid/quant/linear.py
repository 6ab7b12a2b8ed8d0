"""Serving a GPTQ base: the GPTQ linear method, its atomic hot-swap, and building a model from a checkpoint.

Owns ``GPTQLinearMethod`` (plugs into ``inlaid.model.layers.ParallelLinear``),
``swap`` (replace one linear's quantized tensors while serving) and
``load_gptq_model`` (what ``inlaid.model.loader.load_model`` calls for a
directory with ``quantize_config.json`` or a ``quantization_config`` in
``config.json``).

Invariants:
- A GPTQ linear holds the standard layout as buffers: ``qweight`` int32
  ``[K*bits/32, N]``, ``qzeros`` int32 ``[G, N*bits/32]``, ``scales`` fp16
  ``[G, N]`` (kept fp16 whatever the model dtype: bf16 cannot hold every fp16
  scale), ``g_idx`` int32 ``[K]``; plus ``dq_weight``, a non-persistent buffer
  that is None unless ``cache_dequantized`` is on.
- ``apply`` computes ``x @ W + b`` with ``W`` dequantized exactly in fp32 and
  cast once to ``x.dtype`` (``inlaid.kernels.gptq_dequant.gptq_linear``), so it
  equals a dense forward whose weight is ``inlaid.quant.pack.dequantize`` of the
  same tensors, bit for bit.
- ``cache_dequantized=True`` keeps ``W`` dequantized in the activation dtype:
  CPU steps skip the unpacking, at the memory cost of a dense copy of every
  linear (the packed tensors stay too: ~1.1-1.25x the dense model instead of
  ~0.15-0.3x). Off by default.
- Tensor parallelism: ``shard_gptq_layer`` slices a layer's packed tensors for
  one rank: along N (qweight/scales/qzeros columns, bias) for column-parallel
  layers, along K (qweight rows, g_idx, and the groups of those rows) for
  row-parallel ones. Without act-order a K shard boundary must fall on a group
  boundary (ValueError otherwise); with act-order (g_idx not ``k // group``)
  the shard keeps every group's scales/zeros and its slice of g_idx, so any
  permutation dequantizes exactly; such a layer (``num_groups`` set) runs the
  torch dequantize path, not the W4A16 kernels.
- W4A16 kernel tensors (CUDA, 4-bit): ``kernel_tensors`` prepares the ``w4_*``
  buffers once (act-order rows sorted; the tensor-core word order of
  ``w4_layout`` where ``w4a16_gemm.serving_layout`` picks it). Without
  act-order those tensor-core words also replace ``qweight`` (one copy of the
  weight on the GPU): ``checkpoint_words`` rebuilds the checkpoint's layout
  for the paths that read it (fp32 x, the dequantized cache, rollback
  snapshots, ``state_dict``). With act-order the sorted copy sits beside the
  checkpoint's, as before.
- Hot-swap: ``swap`` builds every new tensor first (on the layer's device,
  dequantized cache and W4A16 kernel tensors included). When every one has
  the shape, dtype and device of the buffer it replaces (always, for a
  re-quantization with the same config), it is copied INTO that buffer: the
  storage stays, so CUDA graphs captured on the layer stay valid and need no
  re-capture (``method.version`` does not change). Otherwise the buffers are
  replaced with one ``dict.update`` (``apply`` reads one ``dict(...)`` snapshot
  of it) and ``version`` is bumped. Either way the caller swaps at the
  engine's step boundary, on the thread (and CUDA stream) that runs the
  forwards, so a forward sees a layer all old or all new; the copies are
  stream-ordered before the next forward's kernels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from inlaid.distributed.context import TPContext
from inlaid.distributed.sharding import Shard, projection_shard
from inlaid.kernels import w4a16_gemm as w4k
from inlaid.kernels.gptq_dequant import dequantize_gptq, gptq_linear, pack_geometry
from inlaid.model.arch import ModelArch
from inlaid.model.layers import ParallelLinear, RotaryEmbedding
from inlaid.model.llama import LlamaForCausalLM
from inlaid.model.lora_hook import LoRAHook
from inlaid.quant.gptq import SUPPORTED_BITS
from inlaid.quant.pack import LAYER_KEYS, CheckpointError, load_quantized_checkpoint, validate_layer

logger = logging.getLogger(__name__)

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
"""Quantized linears of a decoder layer, relative to ``model.layers.N``."""


class GPTQLinearMethod:
    """Packed low-bit weight (GPTQ v1 layout); ``apply`` dequantizes with the torch reference."""

    def __init__(self, bits: int, group_size: int, cache_dequantized: bool = False,
                 num_groups: int | None = None) -> None:
        """``num_groups``: fixed group count (an act-order row-parallel shard keeps all groups); default from K."""
        self.num_groups = num_groups
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"GPTQ bits must be one of {SUPPORTED_BITS}, got {bits}")
        if group_size != -1 and group_size < 1:
            raise ValueError(f"GPTQ group_size must be -1 or positive, got {group_size}")
        self.bits, self.group_size, self.cache_dequantized = bits, group_size, cache_dequantized
        self.version = 0
        """Bumped by ``swap`` when it had to allocate new tensors (an in-place swap keeps it): CUDA graphs captured
        over the old storage must then be re-captured."""

    def shapes(self, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
        """Buffer shapes for a ``[out, in]`` linear; ValueError if the layout cannot pack it."""
        vals, words = pack_geometry(self.bits)
        if in_features % vals or out_features % vals:
            raise ValueError(f"{self.bits}-bit GPTQ packs {vals} values per run: in_features {in_features} and "
                             f"out_features {out_features} must be multiples of {vals}")  # fmt: skip
        groups = 1 if self.group_size == -1 else math.ceil(in_features / self.group_size)
        groups = self.num_groups if self.num_groups is not None else groups
        return {"qweight": (in_features // vals * words, out_features), "qzeros": (groups, out_features // vals * words),
                "scales": (groups, out_features), "g_idx": (in_features,)}  # fmt: skip

    def create_weights(self, layer: ParallelLinear, device: torch.device | None, dtype: torch.dtype | None) -> None:
        shp = self.shapes(layer.in_features, layer.out_features)
        gs = layer.in_features if self.group_size == -1 else self.group_size
        layer.register_buffer("qweight", torch.zeros(shp["qweight"], dtype=torch.int32, device=device))
        layer.register_buffer("qzeros", torch.zeros(shp["qzeros"], dtype=torch.int32, device=device))
        layer.register_buffer("scales", torch.zeros(shp["scales"], dtype=torch.float16, device=device))
        g_idx = (torch.arange(layer.in_features, device=device) // gs).clamp(max=shp["scales"][0] - 1)
        layer.register_buffer("g_idx", g_idx.to(torch.int32))
        layer.register_buffer("dq_weight", None, persistent=False)

    def dequantized(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """``W [in, out]``: exact in fp32, cast once to ``dtype``."""
        w = dequantize_gptq(self.checkpoint_words(tensors), tensors["qzeros"], tensors["scales"].float(),
                            tensors["g_idx"], self.bits)  # fmt: skip
        return w.to(dtype)

    def _tc_resident(self, tensors: Mapping[str, torch.Tensor]) -> bool:
        """True when ``qweight`` holds the tensor-core layout words (it is the ``w4_qweight`` tensor itself)."""
        q = tensors["qweight"]
        return tensors.get("w4_qweight") is q and w4k.serving_layout(q, self.group_size) == "tc"

    def checkpoint_words(self, tensors: Mapping[str, torch.Tensor],
                         device: torch.device | str | None = None) -> torch.Tensor:
        """The checkpoint-layout ``qweight`` of a layer's tensors: rebuilt from the tensor-core words where the layer
        keeps only those (``kernel_tensors``); the slow paths (fp32 x, the dequantized cache, rollback snapshots)
        read it, the W4A16 kernels never do. With ``device``: a copy there, converted there (a rollback snapshot
        converts on the host, not beside a serving model on the GPU)."""
        q = tensors["qweight"]
        resident = self._tc_resident(tensors)
        if device is not None:
            q = q.to(device, copy=True)
        return w4k.from_tc_layout(q) if resident else q

    def kernel_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """4-bit on CUDA: the W4A16 kernels' one-time preparation (act-order sorted rows, the tensor-core layout
        where ``serving_layout`` picks it) as ``w4_*`` buffers. Without act-order the tensor-core words also
        replace ``qweight`` (one copy of the weight on the GPU; ``checkpoint_words`` rebuilds the checkpoint's)."""
        if self.bits != 4 or not tensors["qweight"].is_cuda or not w4k.HAS_TRITON or self.num_groups is not None:
            return {}
        if self._tc_resident(tensors):  # prepared already (finalize is idempotent)
            return {}
        gs = tensors["qweight"].shape[0] * 8 if self.group_size == -1 else self.group_size
        p = w4k.prepare_w4(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], gs,
                           layout=w4k.serving_layout(tensors["qweight"], gs))
        out = {"w4_qweight": p.qweight, "w4_qzeros": p.qzeros, "w4_scales": p.scales, "w4_perm": p.perm,
               "w4_locks": p.locks, "w4_acc": p.acc}
        if p.layout == "tc" and p.perm is None:
            out["qweight"] = p.qweight
        return out

    def _packed(self, layer: ParallelLinear, x: torch.Tensor) -> w4k.PackedW4 | None:
        """The layer's W4A16 kernel tensors for ``x`` (prepared on first use), or None when the kernels cannot
        serve it. Reads ``layer._buffers`` once (one atomic snapshot; see the module docstring)."""
        if not (x.is_cuda and self.bits == 4 and w4k.HAS_TRITON and x.dtype != torch.float32
                and self.num_groups is None):
            return None
        snap = dict(layer._buffers)
        if snap.get("w4_qweight") is None:
            prep = self.kernel_tensors(snap)
            _install(layer, prep)
            snap.update(prep)
        gs = snap["w4_qweight"].shape[0] * 8 if self.group_size == -1 else self.group_size
        return w4k.PackedW4(snap["w4_qweight"], snap["w4_qzeros"], snap["w4_scales"], snap["w4_perm"], gs,
                            snap["w4_locks"], snap["w4_acc"], w4k.serving_layout(snap["w4_qweight"], gs))  # fmt: skip

    takes_shrink = True
    """``apply`` / ``apply_group`` take a LoRA ``shrink`` offer (``ParallelLinear.forward_local``, ``forward_group``)."""

    takes_swiglu = True
    """``apply`` takes its input as ``SwiGLU`` (x = the gate; ``ParallelLinear.forward_local``)."""

    takes_x_half = True
    """``apply_group`` takes bf16 x's fp16 copy x * 2**-7 (``x_half``: ``rms_norm``; ``layers.forward_group``)."""

    takes_defer_cast = True
    """``apply(..., defer_cast=True)`` may return ``PendingSums`` (``w4a16_linear``; ``ParallelLinear.forward_local``)."""

    def apply(self, layer: ParallelLinear, x: torch.Tensor, shrink: w4k.LoRAShrink | None = None,
              swiglu: w4k.SwiGLU | None = None, defer_cast: bool = False) -> torch.Tensor | w4k.PendingSums:
        packed = self._packed(layer, x)
        if packed is not None:  # W4A16 kernels (the launch may also run the LoRA shrink and the SwiGLU product)
            return w4k.w4a16_linear(x, packed, layer.bias, shrink=shrink, swiglu=swiglu, defer_cast=defer_cast)
        if swiglu is not None:
            x = swiglu.materialize(x)
        snap = dict(layer._buffers)  # one atomic read; see the module docstring
        w = snap.get("dq_weight")
        if w is not None and w.dtype == x.dtype:
            y = x @ w
            return y if layer.bias is None else y + layer.bias.to(y.dtype)
        # validated at load / swap (validate_layer): no per-forward host read-back of g_idx
        return gptq_linear(x, self.checkpoint_words(snap), snap["qzeros"], snap["scales"].float(), snap["g_idx"],
                           self.bits, layer.bias, check_values=False)  # fmt: skip

    def apply_group(self, layers: Sequence[ParallelLinear], x: torch.Tensor, shrink: w4k.LoRAShrink | None = None,
                    x_half: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``[layer's apply(x)]`` for GPTQ linears that read the same ``x``: on the W4A16 kernels through
        ``w4a16_linear_group`` (one launch for up to 16 rows; it may also run the LoRA ``shrink`` and read
        ``x_half``, x's fp16 copy x * 2**-7, in place of bf16 x), else one ``apply`` each."""
        packs = [lay.quant_method._packed(lay, x) for lay in layers]  # forward_group: every method is a GPTQ one
        if None in packs:
            return [lay.quant_method.apply(lay, x) for lay in layers]
        return w4k.w4a16_linear_group(x, packs, [lay.bias for lay in layers], shrink=shrink, x_half=x_half)

    def finalize(self, layer: ParallelLinear, dtype: torch.dtype) -> None:
        """After loading: build the dequantized cache if enabled (idempotent)."""
        if self.cache_dequantized:
            layer._buffers.update({"dq_weight": self.dequantized(layer._buffers, dtype)})
        _install(layer, self.kernel_tensors(layer._buffers))


def _install(layer: ParallelLinear, tensors: Mapping[str, Any]) -> None:
    """One atomic ``_buffers`` update; the derived ``w4_*`` kernel tensors are non-persistent (not in state_dict),
    and a state dict always gets the checkpoint-layout ``qweight`` (``checkpoint_words``)."""
    layer._non_persistent_buffers_set.update(k for k in tensors if k.startswith("w4_"))
    if not getattr(layer, "_gptq_state_hook", False):
        layer.register_state_dict_post_hook(_checkpoint_state)
        layer._gptq_state_hook = True
    layer._buffers.update(tensors)


def _checkpoint_state(layer: ParallelLinear, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    if isinstance(layer.quant_method, GPTQLinearMethod) and prefix + "qweight" in state:
        state[prefix + "qweight"] = layer.quant_method.checkpoint_words(layer._buffers)


def swap(layer: ParallelLinear, packed: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
    """Atomically replace ``layer``'s qweight/qzeros/scales/g_idx (and cache) with ``packed``'s.

    ``dtype`` is the activation dtype of the dequantized cache (default: the current cache's, else fp32).
    Raises ``CheckpointError`` if the tensors do not fit the layer; the layer is then unchanged.
    """
    method = layer.quant_method
    if not isinstance(method, GPTQLinearMethod):
        raise ValueError(f"swap needs a GPTQ linear, got {type(method).__name__}")
    validate_layer(packed, method.bits, method.group_size, name="swap")
    new: dict[str, Any] = {}
    for key in LAYER_KEYS:
        cur = layer._buffers[key]
        if tuple(packed[key].shape) != tuple(cur.shape):
            raise CheckpointError(f"swap: {key} shape {tuple(packed[key].shape)} != layer's {tuple(cur.shape)}")
        new[key] = packed[key].detach().to(device=cur.device, dtype=cur.dtype).clone()
    if method.cache_dequantized:
        old = layer._buffers.get("dq_weight")
        new["dq_weight"] = method.dequantized(new, dtype or (old.dtype if old is not None else torch.float32))
    new.update(method.kernel_tensors(new))  # re-prepare the W4A16 kernel tensors (CUDA, 4-bit), same atomic update
    if not _copy_in_place(layer, new):
        _install(layer, new)
        method.version += 1  # new storage: captured graphs read the old one


def _copy_in_place(layer: ParallelLinear, tensors: Mapping[str, Any]) -> bool:
    """Copy ``tensors`` into ``layer``'s buffers of the same names if every one matches (shape, dtype, device);
    False, with nothing changed, if any does not (or one side is None where the other is not)."""
    pairs = []
    for key, t in tensors.items():
        cur = layer._buffers.get(key)
        if t is None and cur is None:
            continue
        if t is None or cur is None or t.shape != cur.shape or t.dtype != cur.dtype or t.device != cur.device:
            return False
        pairs.append((cur, t))
    with torch.no_grad():
        for cur, t in pairs:
            cur.copy_(t)
    return True


def replace_linears(model: LlamaForCausalLM, method: GPTQLinearMethod, device: torch.device | None,
                    dtype: torch.dtype | None, num_groups: Mapping[str, int] | None = None) -> None:  # fmt: skip
    """Swap every decoder projection of ``model`` for a GPTQ ``ParallelLinear`` (lm_head stays dense).

    ``num_groups``: per linear name (``model.layers.N.self_attn.o_proj``), a fixed group count (act-order TP shards).
    """
    for i, layer in enumerate(model.model.layers):
        for rel in PROJECTIONS:
            parent_name, name = rel.split(".")
            parent = getattr(layer, parent_name)
            old: ParallelLinear = getattr(parent, name)
            groups = (num_groups or {}).get(f"model.layers.{i}.{rel}")
            qm = GPTQLinearMethod(method.bits, method.group_size, method.cache_dequantized, groups)
            new = ParallelLinear(old.in_features, old.out_features, old.bias is not None, old.parallel, device, dtype,
                                 quant_method=qm, tp=old.tp)
            setattr(parent, name, new)


def shard_gptq_layer(tensors: Mapping[str, torch.Tensor], shard: Shard, bits: int,
                     group_size: int) -> tuple[dict[str, torch.Tensor], bool]:
    """One rank's slice of a GPTQ linear's tensors (see the module docstring); returns (tensors, keeps_all_groups).

    ``shard.dim`` 0 splits N (column-parallel), 1 splits K (row-parallel). ValueError when the packing or the
    groups do not allow the split.
    """
    vals, words = pack_geometry(bits)
    s, e = shard.start, shard.start + shard.size
    if s % vals or shard.size % vals:
        raise ValueError(f"cannot shard a {bits}-bit GPTQ linear at [{s}, {e}) of {shard.full}: {bits}-bit packs "
                         f"{vals} values per run; use a tensor_parallel_size that splits it into multiples of {vals}")
    out = dict(tensors)
    if shard.is_whole:
        return out, False
    if shard.dim == 0:
        out["qweight"] = tensors["qweight"][:, s:e].contiguous()
        out["scales"] = tensors["scales"][:, s:e].contiguous()
        out["qzeros"] = tensors["qzeros"][:, s // vals * words : e // vals * words].contiguous()
        if "bias" in tensors:
            out["bias"] = tensors["bias"][s:e].contiguous()
        return out, False
    out["qweight"] = tensors["qweight"][s // vals * words : e // vals * words].contiguous()
    g_idx = tensors["g_idx"]
    k = g_idx.shape[0]
    gs = k if group_size == -1 else group_size
    ordered = torch.equal(g_idx.long(), torch.arange(k, device=g_idx.device) // gs)
    if not ordered or group_size == -1:  # act-order (or one group): keep every group, slice g_idx
        out["g_idx"] = g_idx[s:e].contiguous()
        return out, not ordered
    if s % gs:
        raise ValueError(f"GPTQ group size {gs} does not divide the row-parallel shard boundary {s} (K={k}): a "
                         "group would straddle two ranks; use a tensor_parallel_size with K/world a multiple of "
                         "the group size")
    g0, g1 = s // gs, -(-e // gs)
    out["scales"] = tensors["scales"][g0:g1].contiguous()
    out["qzeros"] = tensors["qzeros"][g0:g1].contiguous()
    out["g_idx"] = (g_idx[s:e] - g0).contiguous()
    return out, False


def is_gptq_dir(path: str | Path) -> bool:
    """True if ``path`` holds a quantized checkpoint (``quantize_config.json`` or config ``quantization_config``)."""
    import json

    path = Path(path)
    if (path / "quantize_config.json").is_file():
        return True
    cfg = path / "config.json"
    try:
        return cfg.is_file() and "quantization_config" in json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg}: unreadable JSON ({e})") from e


def load_gptq_model(path: str | Path, arch: ModelArch, device: torch.device, dtype: torch.dtype,
                    lora_hook: LoRAHook | None = None, max_positions: int | None = None,
                    cache_dequantized: bool = False, tp: TPContext | None = None) -> LlamaForCausalLM:  # fmt: skip
    """Build ``arch``'s model with GPTQ projections (this rank's shard under ``tp``) and fill it from ``path``."""
    ckpt = load_quantized_checkpoint(path)
    method = GPTQLinearMethod(ckpt.bits, ckpt.group_size, cache_dequantized)
    meta = torch.device("meta")
    model = LlamaForCausalLM(arch, device=meta, dtype=dtype, lora_hook=lora_hook, max_positions=max_positions, tp=tp)
    groups: dict[str, int] = {}
    if model.tp.world_size > 1:
        for name, layer in ckpt.layers.items():
            shard = projection_shard(arch, name.rsplit(".", 1)[1], model.tp.rank, model.tp.world_size)
            ckpt.layers[name], keep_all = shard_gptq_layer(layer, shard, ckpt.bits, ckpt.group_size)
            if keep_all:
                groups[name] = int(ckpt.layers[name]["scales"].shape[0])
    replace_linears(model, method, meta, dtype, groups)
    model.to_empty(device=device)
    model.model.rotary_emb = RotaryEmbedding(arch.head_dim, model.model.rotary_emb.max_positions, arch.rope_theta,
                                             arch.rope_scaling, device)  # fmt: skip
    tensors = {f"{n}.{k}": t for n, layer in ckpt.layers.items() for k, t in layer.items()}
    tensors.update(ckpt.other_tensors)
    _fill(model, tensors, Path(path))
    for module in model.modules():
        if isinstance(module, ParallelLinear) and isinstance(module.quant_method, GPTQLinearMethod):
            module.quant_method.finalize(module, dtype)
    logger.info("loaded GPTQ %d-bit g%d checkpoint %s", ckpt.bits, ckpt.group_size, path)
    return model.eval()


@torch.no_grad()
def _fill(model: LlamaForCausalLM, tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Load dense tensors and GPTQ buffers through the model's own loader (same name/shape checks)."""
    targets: dict[str, torch.Tensor] = dict(model.named_parameters())
    targets.update((n, b) for n, b in model.named_buffers() if "rotary_emb" not in n and not n.endswith("dq_weight"))
    try:
        model.load_weights(tensors.items(), targets=targets)
    except ValueError as exc:
        raise CheckpointError(f"{path}: GPTQ checkpoint: {exc} (only the 7 decoder projections may be quantized; "
                              "everything else must be dense)") from exc


def dense_reference(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{param name: W [out, in]}`` dequantized from every GPTQ linear of ``model`` (fp32, for tests/evals)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, ParallelLinear) and isinstance(module.quant_method, GPTQLinearMethod):
            out[f"{name}.weight"] = module.quant_method.dequantized(module._buffers, torch.float32).t()
    return out
