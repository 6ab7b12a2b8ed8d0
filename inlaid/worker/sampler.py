"""Sampler: logits [S, V] -> one token id per row, honouring each row's SamplingParams.

Invariants:
- Greedy rows (temperature 0) take the argmax; ties break to the lowest id, as in
  transformers' greedy search, so greedy parity tests are exact.
- Sampled rows apply temperature, then top-k, then top-p (nucleus), then draw with
  the exponential-race trick (argmax p/E, E ~ Exp(1)), which equals a categorical
  draw and needs only one random vector per row.
- A row with ``seed`` draws from its own ``torch.Generator`` kept by the caller per
  request, so its tokens do not depend on what else is in the batch.
- No host synchronisation: per-row parameters reach the device in ``non_blocking``
  copies from pinned memory and every branch is decided from the host-side params,
  so the engine can queue the next step while this one runs.
"""

from __future__ import annotations

import torch

from inlaid.sampling import SamplingParams


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p nucleus with -inf (rows: [S, V])."""
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).unsqueeze(1)
    mask = ranks >= k
    probs = sorted_logits.masked_fill(mask, float("-inf")).softmax(dim=-1)
    # Drop a token when the mass strictly before it already reaches top_p (always keeps rank 0).
    mass_before = probs.cumsum(dim=-1) - probs
    mask |= mass_before >= top_p.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """Return [S] int64 token ids for fp32 ``logits`` [S, V]."""
    if logits.shape[0] != len(params) or len(params) != len(generators):
        raise ValueError("logits rows, params and generators must have the same length")
    tokens = logits.argmax(dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled_rows:
        return tokens
    dev = logits.device

    def upload(values: list, dtype: torch.dtype) -> torch.Tensor:
        # from pinned memory: CUDA documents a pageable source as one where the driver may synchronize with the
        # stream before staging the copy
        host = torch.tensor(values, dtype=dtype)
        return (host.pin_memory() if dev.type == "cuda" else host).to(dev, non_blocking=True)

    rows = upload(sampled_rows, torch.int64)
    sub = logits.index_select(0, rows).float()
    sub = sub / upload([params[i].temperature for i in sampled_rows], sub.dtype).unsqueeze(1)
    if any(params[i].top_k > 0 or params[i].top_p < 1.0 for i in sampled_rows):
        top_k = upload([params[i].top_k for i in sampled_rows], torch.int64)
        top_p = upload([params[i].top_p for i in sampled_rows], sub.dtype)
        sub = _apply_top_k_top_p(sub, top_k, top_p)
    probs = sub.softmax(dim=-1)
    noise = torch.empty_like(probs)
    for j, i in enumerate(sampled_rows):
        noise[j].exponential_(generator=generators[i])
    tokens[rows] = (probs / noise).argmax(dim=-1)
    return tokens
