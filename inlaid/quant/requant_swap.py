"""Where a re-quantized layer goes in this process (split out of ``inlaid.quant.requant``).

Owns ``LocalSwapTarget``, the default ``swap_target`` of a ``Requantizer``
(the served model in this process; ``inlaid.distributed.requant.TPSwapTarget``
is the tensor-parallel one), and ``check_serving_model``.

Invariants:
- A swap target works on FULL packed layers: ``check(idx, packed)`` validates
  all seven linears of layer ``idx`` (GPTQ layout, shapes that fit) before
  anything changes, ``snapshot(idx)`` returns the tensors now served (for
  rollback) and ``install(idx, packed)`` replaces all seven; the caller runs
  them at the engine's step boundary, so a forward sees a layer all-old or
  all-new.
- No state of its own beyond the model it swaps into; no global mutable state.
"""

from __future__ import annotations

from pathlib import Path

import torch

from inlaid.quant.linear import PROJECTIONS, GPTQLinearMethod
from inlaid.quant.linear import swap as swap_linear
from inlaid.quant.pack import validate_layer
from inlaid.quant.quantize_model import QuantConfig
from inlaid.quant.requant_job import Packed
from inlaid.quant.requant_source import RequantError

__all__ = ["LocalSwapTarget", "check_serving_model"]


def _linears(model: torch.nn.Module, idx: int) -> dict[str, torch.nn.Module]:
    layer = model.model.layers[idx]
    return {rel: layer.get_submodule(rel) for rel in PROJECTIONS}


def check_serving_model(model: torch.nn.Module, qcfg: QuantConfig, ckpt: Path) -> None:
    """RequantError unless ``model`` serves a GPTQ checkpoint with ``qcfg``'s bits and group size."""
    method = _linears(model, 0)["self_attn.q_proj"].quant_method
    if not isinstance(method, GPTQLinearMethod) or (method.bits, method.group_size) != (
            qcfg.bits, qcfg.group_size):  # fmt: skip
        raise RequantError(f"the served model is not the {qcfg.bits}-bit g{qcfg.group_size} GPTQ "
                           f"checkpoint {ckpt}; serve that checkpoint to add tasks to it")  # fmt: skip


class LocalSwapTarget:
    """Swaps full packed layers into ``model`` (a served GPTQ model), dequantizing to ``serve_dtype``."""

    def __init__(self, model: torch.nn.Module, qcfg: QuantConfig, serve_dtype: torch.dtype) -> None:
        self.model, self.qcfg, self.serve_dtype = model, qcfg, serve_dtype

    def check(self, idx: int, packed: Packed) -> None:
        """RequantError/ValueError unless every linear of ``packed`` is valid and fits layer ``idx``."""
        for rel, lin in _linears(self.model, idx).items():  # all seven first: the layer changes whole or not at all
            validate_layer(packed[rel], self.qcfg.bits, self.qcfg.group_size, f"layer {idx} {rel}")
            for key, t in packed[rel].items():
                if key in lin._buffers and lin._buffers[key] is not None and t.shape != lin._buffers[key].shape:
                    raise RequantError(f"layer {idx} {rel}.{key}: shape {tuple(t.shape)} does not fit")

    def snapshot(self, idx: int) -> Packed:
        """Host copies of the packed tensors layer ``idx`` serves now, kept for a rollback. Copies, because
        ``install`` overwrites the served buffers in place (``inlaid.quant.linear.swap``); on the host, so a job
        does not hold a second packed model on the GPU."""
        keys = ("qzeros", "scales", "g_idx")
        return {rel: {"qweight": lin.quant_method.checkpoint_words(lin._buffers, "cpu"),
                      **{k: lin._buffers[k].to("cpu", copy=True) for k in keys}}
                for rel, lin in _linears(self.model, idx).items()}  # fmt: skip

    def install(self, idx: int, packed: Packed) -> None:
        for rel, lin in _linears(self.model, idx).items():
            swap_linear(lin, packed[rel], self.serve_dtype)
