"""Multi-LoRA shrink/expand over a heterogeneous batch: Triton BGMV kernels + launchers.

Owns the GPU path of ``out[t] += scaling[s] * (x[t] @ A[s]ᵀ) @ B[s]ᵀ`` with
``s = token_slots[t]`` (``-1`` = no adapter: row left untouched). The torch
reference it must match is ``inlaid.kernels.lora_sgmv.lora_apply`` (SGMV) /
``lora_apply_bgmv``; this module imports nothing from ``inlaid`` outside ``inlaid.kernels``.

Shapes (one layer, one projection; same as the reference and ``LoRAPool``):
``x`` [T, in], ``out`` [T, out], ``a_stack`` [S, R, in], ``b_stack`` [S, out, R]
(ranks below R zero-padded, so every rank shares one buffer and the padding adds
exactly 0), ``scalings`` [S] float, ``token_slots`` [T] int in [-1, S).

Form: BGMV (one program per token x K-split for shrink, per token x output
block for expand). The slot is read on the device from the fixed-shape
``token_slots`` tensor: no host sync, no data-dependent shapes, no per-batch
segment building, so the launches are CUDA-graph capturable for a fixed T.
Slots must be < S (not checked on the device; the LoRA pool validates them
when it assigns slots). Shrink splits the input dim over ``num_splits``
programs writing fp32 partials ``[num_splits, T, R]``; expand sums the
partials, scales in fp32 and adds into ``out`` (read-modify-write, one
rounding to out.dtype). Decode batches (T = number of sequences) are the
target; for long prefills every token re-reads its adapter's A/B (T·R·(in+out)
weight bytes), where the segment (SGMV) reference amortises them — callers may
keep prefill on ``lora_apply``. A fused group (q/k/v or gate/up: one shrink over
their shared A buffer) expands in one launch too (``lora_expand_group``: the output
blocks of all members in one grid), so a layer costs 4 shrink and 4 expand launches
instead of 4 and 7. A shrink can also run inside another launch that reads the same
x (``LoRAShrink``, ``shrink_split``: the W4 kernels of ``w4a16_tcl``), which removes
its launch. ``lora_expand`` also takes a base launch's uncast split-K sums
(``w4a16_gemv.PendingSums``) as ``out``: it rounds them as the cast launch would,
adds the deltas and zeroes the sums, which removes the cast launch.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, kernels_interpreted, pdl_options, tl, triton, triton_usable  # noqa: F401 (re-exported)
from .w4a16_gemv import PendingSums

if HAS_TRITON:
    from ._triton import pdl_enter
    from .silu_mul import silu_times
    from .w4a16_gemv import take_sums

    @triton.jit
    def shrink_split(x_ptr, a_ptr, slots_ptr, ws_ptr, t, sp, D_IN, R, k_per_split, stride_xt, stride_xk, stride_as,
                     stride_ar, stride_ak, stride_wsp, stride_wt, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                     ROUNDS: tl.constexpr = False, u_ptr=None, SILU: tl.constexpr = False,
                     ON_CUDA: tl.constexpr = True):
        """Token ``t``'s fp32 partial ``x[t, K range sp] @ A[slot_t, :R, K range sp]ᵀ`` into ``ws[sp, t, :R]`` (0 for
        slot -1): one shrink program, also run inside other launches (``w4a16_tcl``'s W4 kernels). BLOCK_R covers
        R, or with ``ROUNDS`` R is taken BLOCK_R ranks per round (inside a W4 launch, where a rank-64 group's 192
        rows in one tile would take 256 registers a thread). With ``SILU`` the input is ``silu(x) * u``
        (``silu_mul.silu_times``; u strided as x), as the W4 launch it runs in reads it."""
        slot = tl.load(slots_ptr + t).to(tl.int64)
        d_eff = tl.where(slot >= 0, D_IN, 0)  # slot -1: every load masked off, partials are 0
        slot = tl.maximum(slot, 0)
        k_lo = sp * k_per_split
        if ROUNDS:
            for r0 in range(0, R, BLOCK_R):
                _shrink_rows(x_ptr, a_ptr, ws_ptr, t, sp, slot, d_eff, k_lo, r0, R, k_per_split, stride_xt, stride_xk,
                             stride_as, stride_ar, stride_ak, stride_wsp, stride_wt, BLOCK_R, BLOCK_K, u_ptr, SILU,
                             ON_CUDA)
        else:
            _shrink_rows(x_ptr, a_ptr, ws_ptr, t, sp, slot, d_eff, k_lo, 0, R, k_per_split, stride_xt, stride_xk,
                         stride_as, stride_ar, stride_ak, stride_wsp, stride_wt, BLOCK_R, BLOCK_K, u_ptr, SILU, ON_CUDA)

    @triton.jit
    def _shrink_rows(x_ptr, a_ptr, ws_ptr, t, sp, slot, d_eff, k_lo, r0, R, k_per_split, stride_xt, stride_xk,
                     stride_as, stride_ar, stride_ak, stride_wsp, stride_wt, BLOCK_R: tl.constexpr,
                     BLOCK_K: tl.constexpr, u_ptr, SILU: tl.constexpr, ON_CUDA: tl.constexpr):
        """Ranks ``[r0, r0 + BLOCK_R)`` of ``shrink_split``."""
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = (offs_k < d_eff) & (offs_k < k_lo + k_per_split)
            x = tl.load(x_ptr + t * stride_xt + offs_k * stride_xk, mask=mask_k, other=0.0)
            if SILU:
                x = silu_times(x, tl.load(u_ptr + t * stride_xt + offs_k * stride_xk, mask=mask_k, other=0.0),
                               ON_CUDA)
            a = tl.load(a_ptr + slot * stride_as + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                        mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            acc += tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        tl.store(ws_ptr + sp * stride_wsp + t * stride_wt + offs_r, acc, mask=mask_r)

    @triton.jit
    def _shrink_kernel(
        x_ptr, a_ptr, slots_ptr, ws_ptr, T, D_IN, R, k_per_split,
        stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_wsp, stride_wt,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = 0,
    ):
        pdl_enter(PDL)
        shrink_split(x_ptr, a_ptr, slots_ptr, ws_ptr, tl.program_id(0), tl.program_id(1), D_IN, R, k_per_split,
                     stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_wsp, stride_wt, BLOCK_R, BLOCK_K)

    @triton.jit
    def _expand_block(ws_ptr, b_ptr, scal_ptr, out_ptr, t, pid_n, slot, D_OUT, R, NUM_SPLITS, r_off,
                      stride_wsp, stride_wt, stride_bs, stride_bn, stride_br, stride_ot, stride_on,
                      BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SP: tl.constexpr, sums_ptr,
                      SUMS: tl.constexpr):
        """``out[t, block] += scaling[slot] * (Σ_splits partials[:, t, r_off:r_off + R]) @ B[slot, block]ᵀ``.

        ``SUMS``: the base is a split-K launch's fp32 sums ``sums_ptr`` [T, D_OUT] (``PendingSums``): every row,
        slot -1 too, stores ``round(sums)`` (plus its delta) into ``out`` and zeroes the sums."""
        n_eff = tl.where(slot >= 0, D_OUT, 0)  # slot -1: nothing loaded or stored, row untouched
        slot = tl.maximum(slot, 0)
        offs_r = tl.arange(0, BLOCK_R)
        offs_sp = tl.arange(0, BLOCK_SP)
        part = tl.load(ws_ptr + offs_sp[:, None] * stride_wsp + t * stride_wt + r_off + offs_r[None, :],
                       mask=(offs_sp < NUM_SPLITS)[:, None] & (offs_r < R)[None, :], other=0.0)
        y = tl.sum(part, axis=0) * tl.load(scal_ptr + slot).to(tl.float32)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_eff
        b = tl.load(b_ptr + slot * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=mask_n[:, None] & (offs_r < R)[None, :], other=0.0)
        delta = tl.sum(b.to(tl.float32) * y[None, :], axis=1)
        o_ptrs = out_ptr + t * stride_ot + offs_n * stride_on
        if SUMS:
            mask_o = offs_n < D_OUT
            o = take_sums(sums_ptr + t * D_OUT + offs_n, mask_o, out_ptr.dtype.element_ty)
            tl.store(o_ptrs, tl.where(mask_n, (o.to(tl.float32) + delta).to(out_ptr.dtype.element_ty), o),
                     mask=mask_o)
        else:
            o = tl.load(o_ptrs, mask=mask_n, other=0.0)
            tl.store(o_ptrs, (o.to(tl.float32) + delta).to(out_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit
    def _expand_kernel(
        ws_ptr, b_ptr, slots_ptr, scal_ptr, out_ptr, sums_ptr, T, D_OUT, R, NUM_SPLITS,
        stride_wsp, stride_wt, stride_bs, stride_bn, stride_br, stride_ot, stride_on,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SP: tl.constexpr, SUMS: tl.constexpr = False,
        PDL: tl.constexpr = 0,
    ):
        pdl_enter(PDL)
        t = tl.program_id(0)
        slot = tl.load(slots_ptr + t).to(tl.int64)
        _expand_block(ws_ptr, b_ptr, scal_ptr, out_ptr, t, tl.program_id(1), slot, D_OUT, R, NUM_SPLITS, 0,
                      stride_wsp, stride_wt, stride_bs, stride_bn, stride_br, stride_ot, stride_on,
                      BLOCK_R, BLOCK_N, BLOCK_SP, sums_ptr, SUMS)

    @triton.jit
    def _expand_group_kernel(
        ws_ptr, slots_ptr, T, R, NUM_SPLITS, stride_wsp, stride_wt,
        b0, sc0, o0, n0, sb0, so0, b1, sc1, o1, n1, sb1, so1, b2, sc2, o2, n2, sb2, so2, nb0, nb1,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SP: tl.constexpr, PDL: tl.constexpr = 0,
    ):
        """The expands of a fused group (2 or 3 projections sharing one shrink) in one launch: output block
        ``pid`` belongs to member 0 below ``nb0`` blocks, member 1 below ``nb0 + nb1``, else member 2; member j
        reads ranks ``[j*R, (j+1)*R)`` of the group's partials. B stacks are ``[S, n_j, R]`` with rows of R."""
        pdl_enter(PDL)
        t = tl.program_id(0)
        pid = tl.program_id(1)
        slot = tl.load(slots_ptr + t).to(tl.int64)
        if pid < nb0:
            _expand_block(ws_ptr, b0, sc0, o0, t, pid, slot, n0, R, NUM_SPLITS, 0, stride_wsp, stride_wt, sb0, R, 1,
                          so0, 1, BLOCK_R, BLOCK_N, BLOCK_SP, o0, False)
        elif pid < nb0 + nb1:
            _expand_block(ws_ptr, b1, sc1, o1, t, pid - nb0, slot, n1, R, NUM_SPLITS, R, stride_wsp, stride_wt, sb1,
                          R, 1, so1, 1, BLOCK_R, BLOCK_N, BLOCK_SP, o1, False)
        else:
            _expand_block(ws_ptr, b2, sc2, o2, t, pid - nb0 - nb1, slot, n2, R, NUM_SPLITS, 2 * R, stride_wsp,
                          stride_wt, sb2, R, 1, so2, 1, BLOCK_R, BLOCK_N, BLOCK_SP, o2, False)


SHRINK_CHUNK_R = 64
"""Most A rows a shrink program inside a W4 launch holds per round (``shrink_split`` with ``ROUNDS``)."""


SHRINK_BLOCK_K = 128
"""Inputs per round of a shrink program (``lora_shrink_partials``' default and the programs run inside other
launches)."""


class LoRAShrink:
    """A shrink another launch may run beside its own work (``w4a16_tcl``'s W4 kernels read the same x):
    ``x @ a_stack[slot]ᵀ`` as ``lora_shrink_partials`` would give it, in ``num_splits`` K splits. The launch that
    runs it sets ``partials`` ([P, T, R] fp32); a caller that finds ``partials`` still None runs
    ``lora_shrink_partials`` itself, so every path stays correct whether or not its base launch took the offer."""

    def __init__(self, a_stack: torch.Tensor, token_slots: torch.Tensor, num_splits: int | None = None) -> None:
        self.a_stack, self.token_slots, self.num_splits = a_stack, token_slots, num_splits
        self.partials: torch.Tensor | None = None

    def fits(self, x: torch.Tensor, max_rows: int) -> bool:
        """True when x [T, K] matches the stack and slots and the stack has at most ``max_rows`` rows (ranks)."""
        a, s = self.a_stack, self.token_slots
        return (x.dim() == 2 and a.dim() == 3 and a.shape[2] == x.shape[1] and a.shape[1] <= max_rows
                and s.shape == (x.shape[0],) and s.dtype in (torch.int32, torch.int64) and a.dtype == x.dtype
                and a.device == x.device == s.device and a.stride(2) == 1)

    def plan(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(fresh partials [P, T, R], inputs per split) for x [T, K], split as ``lora_shrink_partials`` splits."""
        t, d_in = x.shape
        splits = self.num_splits or default_num_splits(t, d_in)
        ws = torch.empty(splits, t, self.a_stack.shape[1], device=x.device, dtype=torch.float32)
        return ws, _k_per_split(d_in, splits, SHRINK_BLOCK_K)


def _check(x: torch.Tensor, a_stack: torch.Tensor, token_slots: torch.Tensor) -> None:
    if x.dim() != 2 or a_stack.dim() != 3 or x.shape[1] != a_stack.shape[2]:
        raise ValueError(f"x [T, in] and A [S, R, in] must share in; got {tuple(x.shape)} and {tuple(a_stack.shape)}")
    if token_slots.shape != (x.shape[0],) or token_slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"token_slots must be int32/int64 [T={x.shape[0]}], got {token_slots.dtype} {tuple(token_slots.shape)}")
    if not triton_usable(x):
        raise ValueError("Triton LoRA kernels need CUDA (or TRITON_INTERPRET=1); use lora_sgmv.lora_apply")


def default_num_splits(num_tokens: int, d_in: int, num_sms: int = 132) -> int:
    """K-splits for shrink: ~4 programs per SM at decode batch sizes (a bandwidth-bound read of A), >= 256 inputs
    per split, at most 32 (round 2 capped this at 8 splits of >= 512 inputs: < 2 waves at batch 32)."""
    return max(1, min(32, d_in // 256, -(-4 * num_sms // max(num_tokens, 1))))


def _k_per_split(d_in: int, splits: int, block_k: int) -> int:
    """ceil(d_in / splits) rounded up to a multiple of block_k (a split past K stores zeros)."""
    per_split = -(-d_in // splits)
    return -(-per_split // block_k) * block_k


def lora_shrink_partials(
    x: torch.Tensor, a_stack: torch.Tensor, token_slots: torch.Tensor, num_splits: int | None = None,
    block_k: int = SHRINK_BLOCK_K, num_warps: int = 4,
) -> torch.Tensor:
    """Unscaled ``x[t] @ A[slot_t]ᵀ`` as fp32 partial sums ``[num_splits, T, R]`` (rows of slot -1 are 0)."""
    _check(x, a_stack, token_slots)
    t, d_in = x.shape
    r = a_stack.shape[1]
    splits = num_splits or default_num_splits(t, d_in)
    k_per_split = _k_per_split(d_in, splits, block_k)
    ws = torch.empty(splits, t, r, device=x.device, dtype=torch.float32)
    if t == 0:
        return ws
    _shrink_kernel[(t, splits)](
        x, a_stack, token_slots, ws, t, d_in, r, k_per_split,
        x.stride(0), x.stride(1), a_stack.stride(0), a_stack.stride(1), a_stack.stride(2),
        ws.stride(0), ws.stride(1),
        BLOCK_R=max(16, triton.next_power_of_2(r)), BLOCK_K=block_k, num_warps=num_warps, **pdl_options(x),
    )
    return ws


def lora_shrink(
    x: torch.Tensor, a_stack: torch.Tensor, token_slots: torch.Tensor, num_splits: int | None = None
) -> torch.Tensor:
    """Unscaled shrink ``y [T, R]`` fp32, ``y[t] = x[t] @ A[slot_t]ᵀ`` (0 for slot -1)."""
    return lora_shrink_partials(x, a_stack, token_slots, num_splits).sum(dim=0)


def lora_expand(
    y: torch.Tensor, b_stack: torch.Tensor, scalings: torch.Tensor, token_slots: torch.Tensor,
    out: torch.Tensor | PendingSums, block_n: int = 128, num_warps: int = 4,
) -> torch.Tensor:
    """``out[t] += scaling[s] * y[t] @ B[s]ᵀ`` in place (``y`` [T, R] or partials [P, T, R]); returns out.

    ``out`` may be a base launch's ``PendingSums``: the launch then finishes them (rounds each sum as
    ``cast_sums`` would, adds the delta, zeroes the sums) into a new tensor, which it returns."""
    sums = None
    if isinstance(out, PendingSums):
        sums, out = out.sums, torch.empty(out.shape, device=out.device, dtype=out.dtype)
        if not sums.is_contiguous():
            raise ValueError("lora_expand: PendingSums must be contiguous")
    ws = y if y.dim() == 3 else y.unsqueeze(0)
    if ws.dtype != torch.float32 or ws.stride(2) != 1:
        ws = ws.float().contiguous()
    if b_stack.dim() != 3 or out.dim() != 2 or b_stack.shape[1:] != (out.shape[1], ws.shape[2]):
        raise ValueError(f"B {tuple(b_stack.shape)} must be [S, out={out.shape[1]}, R={ws.shape[2]}]")
    if ws.shape[1] != out.shape[0] or scalings.shape != (b_stack.shape[0],):
        raise ValueError(f"y has {ws.shape[1]} tokens, out {out.shape[0]}; scalings must be [S={b_stack.shape[0]}]")
    _check(out, b_stack.transpose(1, 2), token_slots)
    t, d_out = out.shape
    r = b_stack.shape[2]
    if t == 0:
        return out
    _expand_kernel[(t, triton.cdiv(d_out, block_n))](
        ws, b_stack, token_slots, scalings, out, out if sums is None else sums, t, d_out, r, ws.shape[0],
        ws.stride(0), ws.stride(1), b_stack.stride(0), b_stack.stride(1), b_stack.stride(2),
        out.stride(0), out.stride(1),
        BLOCK_R=max(16, triton.next_power_of_2(r)), BLOCK_N=block_n,
        BLOCK_SP=max(2, triton.next_power_of_2(ws.shape[0])), SUMS=sums is not None, num_warps=num_warps,
        **pdl_options(out),
    )
    return out


def lora_expand_group(
    partials: torch.Tensor, b_stacks: list[torch.Tensor], scalings: list[torch.Tensor], token_slots: torch.Tensor,
    outs: list[torch.Tensor], block_n: int = 128, num_warps: int = 4,
) -> list[torch.Tensor]:
    """``lora_expand`` of 2 or 3 projections in one launch: member j adds its delta from ranks ``[j*R, (j+1)*R)``
    of the group's shrink ``partials`` [P, T, n*R] (fp32) into ``outs[j]`` in place; returns ``outs``."""
    n = len(b_stacks)
    if not 2 <= n <= 3 or len(scalings) != n or len(outs) != n:
        raise ValueError(f"a fused expand takes 2 or 3 (B, scalings, out) members, got {n}/{len(scalings)}/{len(outs)}")
    r = b_stacks[0].shape[2]
    if partials.dim() != 3 or partials.dtype != torch.float32 or partials.stride(2) != 1 or partials.shape[2] < n * r:
        raise ValueError(f"partials must be fp32 [P, T, >= {n}*R] with unit rank stride, got {tuple(partials.shape)}")
    for b, sc, out in zip(b_stacks, scalings, outs):
        if b.dim() != 3 or b.shape[1:] != (out.shape[1], r) or b.stride(1) != r or b.stride(2) != 1:
            raise ValueError(f"B {tuple(b.shape)} must be [S, out={out.shape[1]}, R={r}] with contiguous rows")
        if out.shape[0] != partials.shape[1] or out.stride(1) != 1 or sc.shape != (b.shape[0],):
            raise ValueError(f"out {tuple(out.shape)} must have {partials.shape[1]} rows (unit column stride) and "
                             f"scalings [S={b.shape[0]}]")
        _check(out, b.transpose(1, 2), token_slots)
    t = partials.shape[1]
    if t == 0:
        return outs
    blocks = [triton.cdiv(out.shape[1], block_n) for out in outs]
    args = []
    for j in range(3):  # a 2-member group repeats member 1 as member 2 with no blocks
        b, sc, out = (b_stacks[j], scalings[j], outs[j]) if j < n else (b_stacks[1], scalings[1], outs[1])
        args += [b, sc, out, out.shape[1], b.stride(0), out.stride(0)]
    _expand_group_kernel[(t, sum(blocks))](
        partials, token_slots, t, r, partials.shape[0], partials.stride(0), partials.stride(1), *args,
        blocks[0], blocks[1],
        BLOCK_R=max(16, triton.next_power_of_2(r)), BLOCK_N=block_n,
        BLOCK_SP=max(2, triton.next_power_of_2(partials.shape[0])), num_warps=num_warps,
        **pdl_options(partials),
    )
    return outs


def lora_apply_triton(
    x: torch.Tensor,
    out: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    scalings: torch.Tensor,
    token_slots: torch.Tensor,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Shrink + expand in two launches, same result as ``lora_sgmv.lora_apply``; updates ``out`` in place."""
    if a_stack.shape[0] != b_stack.shape[0] or a_stack.shape[1] != b_stack.shape[2]:
        raise ValueError(f"A {tuple(a_stack.shape)} and B {tuple(b_stack.shape)} must share S and R")
    if len({x.dtype, out.dtype, a_stack.dtype, b_stack.dtype}) != 1:
        raise ValueError(f"x, out, A, B must share one dtype; got {x.dtype}, {out.dtype}, {a_stack.dtype}, {b_stack.dtype}")
    partials = lora_shrink_partials(x, a_stack, token_slots, num_splits)
    return lora_expand(partials, b_stack, scalings, token_slots, out)
