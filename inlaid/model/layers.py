"""Building blocks of the Llama-family forward: RMSNorm, RoPE, ParallelLinear, SwiGLU MLP.

Invariants:
- Numerics follow transformers' Llama code (RMSNorm in fp32 then cast back;
  RoPE with the ``rotate_half`` convention, cos/sin computed in fp32 and cast
  to the activation dtype), so fp32 logits match HF within ~1e-5.
- ``ParallelLinear`` records its tensor-parallel role ("column" for q/k/v/
  gate/up, "row" for o/down) and delegates its math to ``self.quant_method``:
  ``DenseLinearMethod`` owns a ``weight`` [out, in] (+ optional ``bias``
  [out]). A quantized method (quant/) can replace it on a live layer: it
  registers its own tensors and implements ``apply``.
- Under tensor parallelism (``tp``, an ``inlaid.distributed.context.TPContext``)
  ``in_features``/``out_features`` are the *local* (per-rank) sizes. A column
  layer's output is the rank's slice (no collective); a row layer's
  ``forward_local`` gives this rank's partial sum and ``reduce`` all-reduces it
  (``forward`` = both). Callers that add to the partial output first (the LoRA
  hook) call the two halves, so a row layer costs one collective in total.
  ``forward_group`` runs sibling layers of one x (q/k/v, gate/up) through their method's ``apply_group`` when it
  has one (the GPTQ method: one W4 kernel launch for up to 16 rows).
  The model mostly goes through ``llama._project`` / ``_project_group`` (``forward_local`` or
  ``forward_group``, then ``reduce``), not ``ParallelLinear.forward``, so module forward hooks on a linear do
  not see every call; code that must see a linear's input (calibration) wraps its ``quant_method.apply``
  instead (``inlaid.quant.calibrate``).
- ``VocabParallelEmbedding`` (world > 1 only): masked lookup of the rank's
  vocab rows, then one all-reduce.
- The MLP here has no LoRA awareness; ``llama.py`` calls the LoRA hook after
  each projection.
- RMSNorm, SwiGLU's ``silu(gate) * up`` and RoPE (+ KV write, called from ``llama.py``) run fused Triton kernels
  (``inlaid.kernels.rms_norm`` / ``silu_mul`` / ``rotary_kv``) on CUDA fp16/bf16 tensors and their torch
  references otherwise; the references are this module's previous code, so CPU and fp32 numerics are
  unchanged.
"""

from __future__ import annotations

import math
from typing import Literal, Protocol

import torch
from torch import nn

from inlaid.distributed.context import TPContext
from inlaid.kernels.lora_sgmv_triton import LoRAShrink
from inlaid.kernels.rms_norm import rms_norm
from inlaid.kernels.silu_mul import SwiGLU
from inlaid.kernels.w4a16_gemv import PendingSums
from inlaid.model.arch import RopeScaling

ParallelRole = Literal["column", "row"]


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), statistics in fp32 (HF Llama's rounding)."""

    def __init__(self, hidden_size: int, eps: float, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor | PendingSums, residual: torch.Tensor | None = None,
                x_half: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)``; with ``residual``: ``(norm(x + residual), x + residual)`` (the pre-norm layer's add, fused).

        The Triton kernel on CUDA fp16/bf16, the torch reference otherwise (``inlaid.kernels.rms_norm``); ``x``
        may be a projection's ``PendingSums``, which the kernel finishes. ``x_half`` (fp16, the output's shape)
        also receives the output * 2**-7 in fp16.
        """
        return rms_norm(x, self.weight, self.eps, residual, x_half)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] in fp32, as transformers' ROPE_INIT_FUNCTIONS compute them."""
    exps = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta ** exps)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"rope type {scaling.rope_type!r} is not supported")


def _llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    assert s.low_freq_factor and s.high_freq_factor and s.original_max_position_embeddings
    old_len = s.original_max_position_embeddings
    low_freq_wavelen = old_len / s.low_freq_factor
    high_freq_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Precomputed fp32 cos/sin tables [max_positions, head_dim]; applied per token position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: RopeScaling | None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        if device is not None and device.type == "meta":
            cos = sin = torch.empty(max_positions, head_dim, device=device)
        else:
            freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos().to(device), emb.sin().to(device)
        self.register_buffer("cos_cache", cos, persistent=False)
        self.register_buffer("sin_cache", sin, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D] in ``dtype`` for token positions [T] (computed once per forward)."""
        cos = self.cos_cache[positions].to(dtype).unsqueeze(1)
        sin = self.sin_cache[positions].to(dtype).unsqueeze(1)
        return cos, sin


class LinearMethod(Protocol):
    """How a ParallelLinear stores its weight and computes y = x Wᵀ + b."""

    def create_weights(self, layer: "ParallelLinear", device: torch.device | None, dtype: torch.dtype | None) -> None:
        ...

    def apply(self, layer: "ParallelLinear", x: torch.Tensor) -> torch.Tensor:
        ...


class DenseLinearMethod:
    """Unquantized: ``layer.weight`` [out, in] (and ``layer.bias`` [out] if any) in the model dtype."""

    def create_weights(self, layer: "ParallelLinear", device: torch.device | None, dtype: torch.dtype | None) -> None:
        layer.weight = nn.Parameter(torch.empty(layer.out_features, layer.in_features, device=device, dtype=dtype),
                                    requires_grad=False)

    def apply(self, layer: "ParallelLinear", x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, layer.weight, layer.bias)


class ParallelLinear(nn.Module):
    """A linear layer that knows its tensor-parallel role; math delegated to ``quant_method``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, parallel: ParallelRole,
                 device: torch.device | None = None, dtype: torch.dtype | None = None,
                 quant_method: LinearMethod | None = None, tp: TPContext | None = None) -> None:
        super().__init__()
        if parallel not in ("column", "row"):
            raise ValueError(f"parallel must be 'column' or 'row', got {parallel!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.parallel = parallel
        self.tp = tp
        self.tp_size = tp.world_size if tp is not None else 1
        self.quant_method: LinearMethod = quant_method or DenseLinearMethod()
        self.quant_method.create_weights(self, device, dtype)
        self.bias = (nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False)
                     if bias else None)

    def forward_local(self, x: torch.Tensor, shrink: LoRAShrink | None = None,
                      swiglu: SwiGLU | None = None, defer_cast: bool = False) -> torch.Tensor | PendingSums:
        """This rank's output: the full/column slice, or a row layer's partial sum (before ``reduce``). A linear
        method that ``takes_shrink`` gets the LoRA hook's ``shrink`` offer (its launch may run it); a method whose
        ``apply`` is wrapped on the instance (``inlaid.quant.calibrate``'s input taps) never does.

        With ``swiglu`` the input is ``silu(x) * swiglu.up``: a method that ``takes_swiglu`` gets it (its launch
        may compute the product as it loads x), any other gets ``swiglu.materialize(x)``, so a wrapper sees the
        product.

        With ``defer_cast`` a method that ``takes_defer_cast`` may return its split-K sums uncast
        (``PendingSums``): the caller's next kernel must finish them (the model's RMSNorm or LoRA expand). Not
        under TP (``reduce`` needs the output) and not through a wrapped ``apply``."""
        method = self.quant_method
        plain = "apply" not in vars(method)
        if swiglu is not None and not (plain and getattr(method, "takes_swiglu", False)):
            x, swiglu = swiglu.materialize(x), None
        kwargs: dict = {} if swiglu is None else {"swiglu": swiglu}
        if plain and _takes(method, shrink):
            kwargs["shrink"] = shrink
        if defer_cast and plain and self.tp_size == 1 and getattr(method, "takes_defer_cast", False):
            kwargs["defer_cast"] = True
        return method.apply(self, x, **kwargs)

    def reduce(self, y: torch.Tensor) -> torch.Tensor:
        """Row-parallel under TP: all-reduce the partial sums (identity otherwise)."""
        if self.parallel == "row" and self.tp_size > 1:
            assert self.tp is not None
            return self.tp.all_reduce(y)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.quant_method.apply(self, x))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"parallel={self.parallel}, tp={self.tp_size}, method={type(self.quant_method).__name__}")


def forward_group(layers: list[ParallelLinear], x: torch.Tensor, shrink: LoRAShrink | None = None,
                  x_half: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``[layer.forward_local(x)]`` for sibling layers that read the same ``x`` (q/k/v, gate/up). When they share a
    linear method that has ``apply_group`` (the GPTQ one), it may run them together (one kernel launch), and may
    run the LoRA hook's ``shrink`` offer (``LoRAShrink``) in that launch, and read ``x_half`` (an fp16 copy
    x * 2**-7 of bf16 x that the RMSNorm wrote, ``wants_x_half``) where it ``takes_x_half``; a method whose
    ``apply`` is wrapped on the instance (``inlaid.quant.calibrate``'s input taps) is always called per layer, so
    the wrapper sees every input."""
    method = layers[0].quant_method
    group = getattr(method, "apply_group", None)
    if group is not None and all(type(lay.quant_method) is type(method) and "apply" not in vars(lay.quant_method)
                                 for lay in layers):
        kwargs: dict = {"shrink": shrink} if _takes(method, shrink) else {}
        if x_half is not None and getattr(method, "takes_x_half", False):
            kwargs["x_half"] = x_half
        return group(layers, x, **kwargs)
    return [layer.forward_local(x) for layer in layers]


def wants_x_half(layer: ParallelLinear, x: torch.Tensor | PendingSums) -> bool:
    """Whether the RMSNorm before ``layer`` (and its siblings) should also write x * 2**-7 in fp16 for them
    (``rms_norm``'s ``x_half``): a decode row of bf16 activations on a GPU, into a linear method that
    ``takes_x_half`` (the GPTQ one: its M = 1 W4 launch then reads x as 32-bit pairs, ``w4a16_tcl``), called
    plainly (not through a wrapped ``apply``)."""
    method = layer.quant_method
    return (x.shape[0] == 1 and x.dtype == torch.bfloat16 and x.device.type == "cuda"
            and getattr(method, "takes_x_half", False) and "apply" not in vars(method))


def _takes(method: object, shrink: LoRAShrink | None) -> bool:
    """Whether to hand ``shrink`` to ``method``: there is an offer and the method ``takes_shrink``."""
    return shrink is not None and getattr(method, "takes_shrink", False)


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); projections exposed for the LoRA hook."""

    def __init__(self, hidden: int, intermediate: int, bias: bool, device: torch.device | None = None,
                 dtype: torch.dtype | None = None, tp: TPContext | None = None) -> None:
        """``intermediate`` is the local (per-rank) size under TP."""
        super().__init__()
        self.gate_proj = ParallelLinear(hidden, intermediate, bias, "column", device, dtype, tp=tp)
        self.up_proj = ParallelLinear(hidden, intermediate, bias, "column", device, dtype, tp=tp)
        self.down_proj = ParallelLinear(intermediate, hidden, bias, "row", device, dtype, tp=tp)

    def forward(self, x: torch.Tensor, defer_cast: bool = False,
                x_half: torch.Tensor | None = None) -> torch.Tensor | PendingSums:
        """``down(silu(gate(x)) * up(x))``; ``defer_cast``: down_proj may return ``PendingSums``
        (``ParallelLinear.forward_local``); ``x_half``: x's fp16 copy for gate/up (``forward_group``)."""
        gate, up = forward_group([self.gate_proj, self.up_proj], x, x_half=x_half)  # column layers: no reduce
        return self.down_proj.reduce(self.down_proj.forward_local(gate, swiglu=SwiGLU(up), defer_cast=defer_cast))


class VocabParallelEmbedding(nn.Embedding):
    """Rows ``[vocab_start, vocab_start + num_embeddings)`` of the embedding (tail past ``vocab_size`` is padding).

    ``forward``: ids outside the rank's rows look up row 0 and are zeroed, then one all-reduce sums the ranks.
    """

    def __init__(self, vocab_size: int, hidden: int, vocab_start: int, rows: int, tp: TPContext,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(rows, hidden, device=device, dtype=dtype)
        self.weight.requires_grad_(False)
        self.vocab_size, self.vocab_start, self.tp = vocab_size, vocab_start, tp
        self.vocab_end = min(vocab_start + rows, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.vocab_start) & (ids < self.vocab_end)
        local = torch.where(mine, ids - self.vocab_start, torch.zeros_like(ids))
        out = nn.functional.embedding(local, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(out)
