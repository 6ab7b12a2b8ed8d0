"""GPTQ dequantize + matmul: torch reference on the standard packed layout.

Owns the *reading* side of the GPTQ checkpoint layout (``inlaid.quant.pack``
owns writing). Imports nothing from ``inlaid``. A later issue adds a Triton
kernel with the same signature; this reference is what it is tested against.

Layout (AutoGPTQ / transformers-optimum "gptq" v1 checkpoint format), for
``bits`` in {2, 3, 4, 8}, ``K`` = in_features, ``N`` = out_features, ``G`` =
number of groups:

- ``qweight`` int32 ``[K * bits / 32, N]``: codes packed along the input dim.
  The 32·bits bits of each run of ``32 / gcd(bits, 32)`` consecutive input rows
  form one little-endian bit stream: element ``j`` of the run sits at bit
  offset ``bits * j`` of the run's words (word ``w`` holds stream bits
  ``32w .. 32w+31``, LSB first). For 2/4/8 bits this is "element j of a word at
  bit ``bits*j``"; for 3 bits it is AutoGPTQ's packing of 32 values into 3
  words (values 10 and 21 straddle word boundaries).
- ``qzeros`` int32 ``[G, N * bits / 32]``: integer zero points minus one
  (``zero - 1``, the classic v1 convention), packed the same way along the
  output dim. Readers add 1 *without* wrapping, like AutoGPTQ's and
  transformers' kernels, so a stored ``2**bits - 1`` reads as ``2**bits``.
- ``scales`` float ``[G, N]`` (fp16 in checkpoints).
- ``g_idx`` int ``[K]``: group of each input row.

Dequantized weight: ``W[k, n] = scales[g_idx[k], n] * (code[k, n] - zero[g_idx[k], n])``,
returned as ``[K, N]`` (so ``y = x @ W``). The product is formed in fp32 and cast
once to the scales' dtype: exact whenever scales are fp16 values.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
_MASK32 = 0xFFFFFFFF


def pack_geometry(bits: int) -> tuple[int, int]:
    """``(values_per_run, words_per_run)`` of the bit-stream packing for ``bits``."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    g = math.gcd(bits, 32)
    return 32 // g, bits // g


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpack int32 ``[R, C]`` packed along dim 0 into int32 codes ``[R * 32 / bits, C]``."""
    vals, words = pack_geometry(bits)
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"packed tensor must be 2-D int32, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[0] % words:
        raise ValueError(f"{bits}-bit packed rows ({packed.shape[0]}) must be a multiple of {words}")
    runs = packed.to(torch.int64).bitwise_and(_MASK32).reshape(-1, words, packed.shape[1])
    mask = (1 << bits) - 1
    out = []
    for j in range(vals):
        off = bits * j
        w, s = divmod(off, 32)
        v = runs[:, w] >> s
        if s + bits > 32:
            v = v | (runs[:, w + 1] << (32 - s))
        out.append(v & mask)
    return torch.stack(out, dim=1).reshape(-1, packed.shape[1]).to(torch.int32)


def _check(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int) -> None:
    vals, words = pack_geometry(bits)
    if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2 or g_idx.dim() != 1:
        raise ValueError("qweight, qzeros, scales must be 2-D and g_idx 1-D")
    if not scales.is_floating_point():
        raise ValueError(f"scales must be floating point, got {scales.dtype}")
    k = qweight.shape[0] // words * vals
    n = qweight.shape[1]
    if scales.shape[1] != n or qzeros.shape[0] != scales.shape[0]:
        raise ValueError(f"scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} do not match qweight {tuple(qweight.shape)}")
    if qzeros.shape[1] * vals // words != n or qzeros.shape[1] % words:
        raise ValueError(f"qzeros {tuple(qzeros.shape)} does not pack {n} output columns at {bits} bits")
    if g_idx.shape[0] != k:
        raise ValueError(f"g_idx has {g_idx.shape[0]} entries, qweight packs {k} input rows")


def dequantize_gptq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
    check_values: bool = True,
) -> torch.Tensor:
    """Dequantize packed GPTQ tensors to ``W [in, out]`` in ``scales.dtype``.

    ``check_values=False`` skips the g_idx range check, which reads values back to the host: for tensors
    already validated (``inlaid.quant.pack.validate_layer`` at load and swap), so a served forward does no
    host sync and can be captured in a CUDA graph.
    """
    _check(qweight, qzeros, scales, g_idx, bits)
    codes = unpack_rows(qweight, bits)  # [K, N]
    zeros = unpack_rows(qzeros.t().contiguous(), bits).t() + 1  # [G, N], v1: stored = zero - 1
    g = g_idx.long()
    if check_values and g.numel() and (int(g.min()) < 0 or int(g.max()) >= scales.shape[0]):
        raise ValueError(f"g_idx values must lie in [0, {scales.shape[0]})")
    w = (codes - zeros[g]).to(torch.float32) * scales.to(torch.float32)[g]
    return w.to(scales.dtype)


def gptq_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
    check_values: bool = True,
) -> torch.Tensor:
    """``x [..., in] @ W [in, out] (+ bias)`` with ``W`` dequantized from the packed layout; result in x.dtype."""
    w = dequantize_gptq(qweight, qzeros, scales, g_idx, bits, check_values).to(x.dtype)
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects {w.shape[0]}")
    y = x @ w
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y
