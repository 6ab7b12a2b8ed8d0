"""Re-quantization under tensor parallelism: hot-swap a re-quantized decoder layer on every rank.

Division of labour (docs/tp.md): rank 0 runs the ``inlaid.quant.requant.Requantizer``
exactly as at TP=1 (Hessians from the unquantized base, GPTQ of the FULL layer,
the persisted checkpoint and Hessian store written once, by rank 0). Only the
swap differs: ``TPSwapTarget.install`` broadcasts ``("swap_layer", idx, full)``
on the control group and then every rank, rank 0 included, runs
``swap_layer_shard``: it cuts its shard with the loader's own code
(``projection_shard`` + ``inlaid.quant.linear.shard_gptq_layer``), so a swapped
layer is bit-identical to loading the new checkpoint at that world size.

Invariants:
- a swap is all-or-nothing over ranks and over the seven linears of the layer:
  every rank first cuts and checks all seven, the ranks agree with one
  all-reduce (data group, so a dead peer times out), and only if every rank
  succeeded does any rank install anything;
- the swap runs on rank 0's engine thread between steps (``between_steps``),
  which is also the only thread that broadcasts steps, so every rank sees the
  swap between the same two forwards;
- the old layer for a rollback is read (full) from the stored checkpoint, which
  is what the ranks are serving: a job persists only after all its swaps, and
  jobs run one at a time.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open

from inlaid.distributed.context import TPContext
from inlaid.distributed.sharding import Shard, projection_shard
from inlaid.model.arch import ModelArch
from inlaid.quant.linear import PROJECTIONS, shard_gptq_layer
from inlaid.quant.linear import swap as swap_linear
from inlaid.quant.pack import LAYER_KEYS, WEIGHTS_NAME, validate_layer

logger = logging.getLogger(__name__)

Packed = dict[str, dict[str, torch.Tensor]]


def _linears(model: torch.nn.Module, idx: int) -> dict[str, torch.nn.Module]:
    layer = model.model.layers[idx]
    return {rel: layer.get_submodule(rel) for rel in PROJECTIONS}


def cut_linear(full: Mapping[str, torch.Tensor], shard: Shard, bits: int, group_size: int,
               keep_all_groups: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
    """One rank's slice of a full GPTQ linear (the loader's ``shard_gptq_layer``).

    ``keep_all_groups`` (a row shard served with every group, as act-order layers are loaded) keeps the full
    scales/qzeros and slices only ``g_idx``, which dequantizes exactly for any ``g_idx``.
    """
    tensors = {k: full[k] for k in LAYER_KEYS}
    out, _ = shard_gptq_layer(tensors, shard, bits, group_size)
    if keep_all_groups and shard.dim == 1 and not shard.is_whole:
        out.update(scales=tensors["scales"], qzeros=tensors["qzeros"],
                   g_idx=tensors["g_idx"][shard.start : shard.start + shard.size].contiguous())
    return out


def cut_layer(full: Packed, arch: ModelArch, rank: int, world: int, bits: int, group_size: int,
              keep_all: Mapping[str, bool] | None = None) -> Packed:  # fmt: skip
    """``rank``'s shard of every projection of one decoder layer (ValueError if the layer cannot be split)."""
    keep_all = keep_all or {}
    return {rel: cut_linear(full[rel], projection_shard(arch, rel.rsplit(".", 1)[1], rank, world), bits,
                            group_size, keep_all.get(rel, False))
            for rel in PROJECTIONS}  # fmt: skip


def _keeps_all_groups(lin: torch.nn.Module, shard: Shard, group_size: int) -> bool:
    """Whether the served row shard holds every group (loaded from an act-order layer)."""
    if shard.dim != 1 or shard.is_whole or group_size == -1:
        return False
    return int(lin._buffers["scales"].shape[0]) == -(-shard.full // group_size)


def _prepare(model: torch.nn.Module, arch: ModelArch, tp: TPContext, idx: int, full: Packed) -> Packed:
    """Cut this rank's shard of layer ``idx`` and check it fits every served linear (raises, changes nothing)."""
    linears = _linears(model, idx)
    method = linears["self_attn.q_proj"].quant_method
    bits, gs = method.bits, method.group_size
    keep_all = {rel: _keeps_all_groups(lin, projection_shard(arch, rel.rsplit(".", 1)[1], tp.rank, tp.world_size),
                                       gs)
                for rel, lin in linears.items()}  # fmt: skip
    local = cut_layer(full, arch, tp.rank, tp.world_size, bits, gs, keep_all)
    for rel, lin in linears.items():
        validate_layer(local[rel], bits, gs, f"layer {idx} {rel}")
        for key in LAYER_KEYS:
            if tuple(local[rel][key].shape) != tuple(lin._buffers[key].shape):
                raise ValueError(f"layer {idx} {rel}.{key}: shard shape {tuple(local[rel][key].shape)} does not fit "
                                 f"the served {tuple(lin._buffers[key].shape)} on rank {tp.rank}")
    return local


def swap_layer_shard(model: torch.nn.Module, arch: ModelArch, tp: TPContext, idx: int, full: Packed,
                     dtype: torch.dtype) -> str | None:  # fmt: skip
    """Every rank: cut, agree, install layer ``idx``. Returns None when all ranks swapped, else why none did.

    Collective (one all-reduce on the data group): every rank must call it for the same layer.
    """
    try:
        local: Packed | None = _prepare(model, arch, tp, idx, full)
        error = None
    except Exception as exc:  # reported through the agreement, never raised before it
        local, error = None, f"rank {tp.rank}: {type(exc).__name__}: {exc}"
        logger.error("cannot swap layer %d here: %s", idx, error)
    ok = torch.tensor([0.0 if local is None else 1.0], device=tp.device)
    tp.all_reduce(ok)
    if int(ok.item()) != tp.world_size:
        return error or f"another rank could not take layer {idx}; no rank swapped it"
    assert local is not None
    for rel, lin in _linears(model, idx).items():
        swap_linear(lin, local[rel], dtype)
    return None


def read_layer(ckpt: Path, idx: int) -> Packed:
    """The full packed tensors of decoder layer ``idx`` as stored in ``ckpt``'s ``model.safetensors``."""
    with safe_open(str(Path(ckpt) / WEIGHTS_NAME), framework="pt") as f:
        return {rel: {k: f.get_tensor(f"model.layers.{idx}.{rel}.{k}") for k in LAYER_KEYS} for rel in PROJECTIONS}


class TPSwapTarget:
    """The ``Requantizer``'s swap target on rank 0 of a tensor-parallel engine (see the module docstring)."""

    def __init__(self, ckpt: str | Path, arch: ModelArch, model: torch.nn.Module, runner: Any,
                 dtype: torch.dtype) -> None:  # fmt: skip
        """``runner`` is the engine's ``TPDriverRunner`` (its ``run_on_all`` broadcasts and marks failures)."""
        self.ckpt, self.arch, self.model, self.runner, self.dtype = Path(ckpt), arch, model, runner, dtype
        method = _linears(model, 0)["self_attn.q_proj"].quant_method
        self.bits, self.group_size = method.bits, method.group_size
        self.tp: TPContext = runner.runner.tp

    def check(self, idx: int, full: Packed) -> None:
        """ValueError (nothing sent) when the full layer is malformed or cannot be cut for some rank."""
        for rel in PROJECTIONS:
            validate_layer(full[rel], self.bits, self.group_size, f"layer {idx} {rel}")
        for rank in range(self.tp.world_size):
            cut_layer(full, self.arch, rank, self.tp.world_size, self.bits, self.group_size)

    def snapshot(self, idx: int) -> Packed:
        """The full layer every rank serves now (the stored checkpoint's; see the module docstring)."""
        return read_layer(self.ckpt, idx)

    def install(self, idx: int, full: Packed) -> None:
        """Swap layer ``idx`` on every rank (ValueError when no rank swapped; TPWorkerError when the group broke)."""
        full = {rel: {k: t.detach().cpu() for k, t in d.items() if k in LAYER_KEYS} for rel, d in full.items()}
        error = self.runner.run_on_all(("swap_layer", idx, full),
                                       lambda: swap_layer_shard(self.model, self.arch, self.tp, idx, full, self.dtype))
        if error is not None:
            raise ValueError(f"swap of layer {idx} refused on the tensor-parallel ranks: {error}")
