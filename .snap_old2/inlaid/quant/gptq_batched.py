"""GPTQ of ONE weight matrix against MANY Hessians at once (a batch of quantizations).

Owns ``gptq_quantize_many``: the same algorithm, grid and result type as
``inlaid.quant.gptq.gptq_quantize`` (no act-order), run for ``B`` Hessians of
the same weight in one pass. GPTQ's column loop is sequential, so on a GPU each
column costs a dozen small kernel launches whatever the matrix size; batching
the Hessians of several methods (MLGPTQ, its repairs, the mixed mean, every
task's own Hessian) makes them share those launches, which is what lets a
quality table with one model per method and task run in minutes. Rows of
different weights that share a Hessian (q/k/v, gate/up) can be stacked along
``out`` by the caller and split back with ``split_rows``: GPTQ treats rows
independently.

Invariants:
- Inputs are not modified; work is fp32 on ``weight``'s device.
- The column loop is ``inlaid.quant.gptq.column_loop``, the same code as
  ``gptq_quantize``'s. Per item, the result equals
  ``gptq_quantize(weight, hessians[b], ...)`` up to fp32 rounding of the batched
  vs unbatched matmuls of the lazy block updates (tests bound the difference);
  the incremental re-quantization path keeps using ``gptq_quantize``, so its
  bit-identity guarantee does not depend on this module.
- Damping: per item, ``percdamp`` x its mean diagonal, x10 per failed Cholesky
  (the same retry rule as ``gptq_quantize``), recorded in ``QuantResult.damp``.
"""

from __future__ import annotations

import logging

import torch

from inlaid.quant.gptq import QuantResult, column_loop, find_params, validate_args

logger = logging.getLogger(__name__)


def _prepare_many(weight: torch.Tensor, hessians: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n_in = weight.shape[1]
    if hessians.dim() != 3 or tuple(hessians.shape[1:]) != (n_in, n_in):
        raise ValueError(f"hessians must be [B, {n_in}, {n_in}] for in_features {n_in}, got {tuple(hessians.shape)}")
    if hessians.shape[0] < 1:
        raise ValueError("hessians: give at least one Hessian")
    if not torch.isfinite(hessians).all():
        raise ValueError("a Hessian contains NaN or Inf")
    h = hessians.detach().to(device=weight.device, dtype=torch.float32).clone()
    w = weight.detach().to(torch.float32).unsqueeze(0).repeat(h.shape[0], 1, 1)
    dead = torch.diagonal(h, dim1=1, dim2=2) == 0  # [B, I]
    torch.diagonal(h, dim1=1, dim2=2).masked_fill_(dead, 1.0)
    w.masked_fill_(dead[:, None, :], 0.0)
    return w, h


def _hinv_upper_many(h: torch.Tensor, percdamp: float, max_retries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factors of ``(H_b + damp_b·I)⁻¹`` ``[B, I, I]`` and the damps ``[B]``."""
    mean_diag = torch.diagonal(h, dim1=1, dim2=2).mean(dim=1)
    pd = torch.full_like(mean_diag, percdamp)
    eye = torch.eye(h.shape[1], dtype=h.dtype, device=h.device)
    upper = torch.empty_like(h)
    todo = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
    for attempt in range(max_retries + 1):
        idx = torch.nonzero(todo).flatten()
        damp = (pd * mean_diag)[idx]
        lower, info = torch.linalg.cholesky_ex(h[idx] + damp[:, None, None] * eye)
        up, info2 = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
        ok = (info == 0) & (info2 == 0) & torch.isfinite(up).flatten(1).all(dim=1)
        upper[idx[ok]] = up[ok]
        todo[idx[ok]] = False
        if not bool(todo.any()):
            return upper, pd * mean_diag
        nxt = torch.where(pd > 0, pd * 10, torch.full_like(pd, 0.01))
        pd = torch.where(todo, nxt, pd)
        if attempt < max_retries:
            logger.warning("GPTQ: %d Hessian(s) not positive definite; retrying with more damping", int(todo.sum()))
    raise ValueError(
        f"{int(todo.sum())} Hessian(s) not positive definite even with percdamp={float(pd.max()) / 10:g} after "
        f"{max_retries} retries; check the calibration data (NaN/Inf, too few samples) or raise percdamp"
    )


def gptq_quantize_many(
    weight: torch.Tensor,
    hessians: torch.Tensor,
    bits: int,
    group_size: int = 128,
    sym: bool = True,
    percdamp: float = 0.01,
    block_size: int = 128,
    max_retries: int = 5,
) -> list[QuantResult]:
    """Quantize ``weight [O, I]`` once per Hessian in ``hessians [B, I, I]``; one ``QuantResult`` per Hessian."""
    validate_args(weight, bits, group_size)
    if percdamp < 0 or block_size < 1:
        raise ValueError(f"percdamp must be >= 0 and block_size >= 1, got {percdamp}, {block_size}")
    w, h = _prepare_many(weight, hessians)
    n_b, n_out, n_in = w.shape
    gs = n_in if group_size == -1 else group_size
    hinv, damp = _hinv_upper_many(h, percdamp, max_retries)
    block = max(block_size // gs, 1) * gs if group_size != -1 else block_size
    codes = torch.zeros_like(w)
    deq = torch.zeros_like(w)
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []
    if group_size == -1:  # one group per row: parameters of the whole (unmodified) row
        s, z = find_params(w.reshape(n_b * n_out, n_in), bits, sym)
        scales, zeros = [s.view(n_b, n_out)], [z.view(n_b, n_out)]
    loss = torch.zeros(n_b, dtype=torch.float64, device=w.device)
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        err, block_loss = _block_many(w, hinv, i1, i2, gs if group_size != -1 else 0, bits, sym, codes, deq,
                                      scales, zeros)  # fmt: skip
        loss += block_loss
        if i2 < n_in:
            w[..., i2:] -= torch.bmm(err, hinv[:, i1:i2, i2:])
    sc, zr = torch.stack(scales, dim=1), torch.stack(zeros, dim=1)  # [B, G, O]
    g_idx = (torch.arange(n_in, device=w.device) // gs).to(torch.int32)
    return [
        QuantResult(qweight=codes[b].to(torch.uint8), scales=sc[b], zeros=zr[b], g_idx=g_idx, perm=None,
                    weight=deq[b], loss=float(loss[b]), bits=bits, group_size=group_size, sym=sym,
                    damp=float(damp[b]))
        for b in range(n_b)
    ]  # fmt: skip


def _block_many(w: torch.Tensor, hinv: torch.Tensor, i1: int, i2: int, gs: int, bits: int, sym: bool,
                codes: torch.Tensor, deq: torch.Tensor, scales: list[torch.Tensor],
                zeros: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Columns ``[i1, i2)`` of every item (``gptq.column_loop``); a new group's grid is taken from the current
    (error-updated) columns, as in ``gptq_quantize``. Returns the scaled errors ``[B, O, n]`` and losses ``[B]``."""
    n_b, n_out = w.shape[:2]

    def params(i: int, w1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if gs and (i1 + i) % gs == 0:
            s, z = find_params(w1[..., i : i + gs].reshape(n_b * n_out, -1), bits, sym)
            scales.append(s.view(n_b, n_out))
            zeros.append(z.view(n_b, n_out))
        return scales[-1], zeros[-1]

    return column_loop(w[..., i1:i2].clone(), hinv[:, i1:i2, i1:i2], params, bits, codes[..., i1:i2],
                       deq[..., i1:i2])  # fmt: skip


def split_rows(res: QuantResult, sizes: list[int]) -> list[QuantResult]:
    """Split a result of row-stacked weights (e.g. q/k/v sharing one Hessian) back into one per weight."""
    if sum(sizes) != res.qweight.shape[0]:
        raise ValueError(f"row sizes {sizes} do not add up to {res.qweight.shape[0]} rows")
    out, r0 = [], 0
    for n in sizes:
        rows = slice(r0, r0 + n)
        out.append(QuantResult(qweight=res.qweight[rows], scales=res.scales[:, rows], zeros=res.zeros[:, rows],
                               g_idx=res.g_idx, perm=None, weight=res.weight[rows], loss=float("nan"),
                               bits=res.bits, group_size=res.group_size, sym=res.sym, damp=res.damp))  # fmt: skip
        r0 += n
    return out
