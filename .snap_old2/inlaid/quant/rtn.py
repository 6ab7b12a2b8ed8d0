"""Round-to-nearest quantization: the no-Hessian baseline, same grid and result type as GPTQ.

Owns only the RTN loop; the grid (``find_params``/``quantize_with``) and
``QuantResult`` come from ``inlaid.quant.gptq`` so both methods write identical
formats. ``g_idx[k] = k // group_size``; no permutation. ``loss`` is
``Σ (w - ŵ)²`` (RTN has no Hessian).
"""

from __future__ import annotations

import torch

from inlaid.quant.gptq import QuantResult, find_params, quantize_with, validate_args


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int = 128, sym: bool = True) -> QuantResult:
    """Quantize ``weight [out, in]`` group by group to the nearest grid point."""
    validate_args(weight, bits, group_size)
    w = weight.detach().to(torch.float32)
    n_out, n_in = w.shape
    gs = n_in if group_size == -1 else group_size
    codes = torch.empty(n_out, n_in, dtype=torch.uint8, device=w.device)
    deq = torch.empty_like(w)
    scales, zeros = [], []
    for g0 in range(0, n_in, gs):
        chunk = w[:, g0 : g0 + gs]
        scale, zero = find_params(chunk, bits, sym)
        code, q = quantize_with(chunk, scale[:, None], zero[:, None], bits)
        codes[:, g0 : g0 + gs] = code.to(torch.uint8)
        deq[:, g0 : g0 + gs] = q
        scales.append(scale)
        zeros.append(zero)
    g_idx = (torch.arange(n_in, device=w.device) // gs).to(torch.int32)
    return QuantResult(
        qweight=codes, scales=torch.stack(scales), zeros=torch.stack(zeros), g_idx=g_idx, perm=None,
        weight=deq, loss=float(((w - deq) ** 2).sum()), bits=bits, group_size=group_size, sym=sym,
    )  # fmt: skip
