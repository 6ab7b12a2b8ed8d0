"""4-bit GPTQ layout for the W4A16 kernels: validation, nibble (un)packing, act-order preparation.

Owns the one-time, load-side preparation shared by ``w4a16_gemv`` (small M),
``w4a16_gemm`` (tiled, larger M) and ``w4_dequant`` (dequantize for cuBLAS).
Torch reference of the math: ``inlaid.kernels.gptq_dequant.dequantize_gptq`` /
``gptq_linear`` (the reading side of the checkpoint layout).

Layout (K = in_features, N = out_features, G = ceil(K / group_size) groups):
- ``qweight`` int32 [K/8, N]: row k's code is bits ``4*(k%8) ..`` of word ``k//8``;
- ``qzeros`` int32 [G, N/8]: ``zero - 1`` packed the same way along N (read back
  as stored + 1, no wrap, like AutoGPTQ);
- ``scales`` float [G, N]; ``W[k, n] = scales[g, n] * (code[k, n] - zero[g, n])``.

Invariants of a ``PackedW4`` (what the kernels rely on):
- the group of input row k is ``k // group_size`` ("monotone" g_idx); the last
  group may be partial (K % group_size != 0, allowed by the GPTQ format);
- act-order checkpoints were made monotone once by ``prepare_act_order``: rows
  of ``qweight`` permuted so that the sorted g_idx is ``arange(K)//group_size``;
  the kernels gather ``x[:, perm]`` per call (``x[:, perm] @ W[perm] == x @ W``);
- tensors are contiguous; ``locks`` is a zeroed int32 buffer the GEMV "fixup"
  and "atomic_last" modes use as per-tile semaphores, ``acc`` a zeroed fp32
  [N] row the M = 1 "atomic_last" mode sums into (the kernel leaves both
  zeroed again).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def num_groups(k: int, group_size: int) -> int:
    """Number of quantization groups of K input rows (the last one may be partial)."""
    return -(-k // group_size)


def kernel_group_size(group_size: int, k: int) -> int:
    """Group size the kernels see: one group covering all K rows becomes a power of two >= K.

    Any power-of-two K tile then lies in group 0 (one scale row per tile, no per-row gather).
    """
    return 1 << max(0, (k - 1).bit_length()) if group_size >= k else group_size


def check_w4(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
             group_size: int) -> None:
    """ValueError naming what to fix unless x [M, K] and the 4-bit tensors fit each other."""
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be 2-D fp16/bf16/fp32 [M, K], got {x.dtype} {tuple(x.shape)}")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or qweight.dim() != 2 or qzeros.dim() != 2:
        raise ValueError("qweight and qzeros must be 2-D int32 (GPTQ layout)")
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} features, 4-bit qweight packs {k} input rows")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1 (-1 is resolved by prepare_w4), got {group_size}")
    g = num_groups(k, group_size)
    if n % 8 or scales.shape != (g, n) or qzeros.shape != (g, n // 8):
        raise ValueError(
            f"scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} must be [{g}, {n}] / [{g}, {n // 8}] "
            f"for K={k}, N={n}, group_size={group_size} (N a multiple of 8)"
        )


def unpack4_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] packed along dim 0 at 4 bits -> int32 codes [8R, C] (row 8r+j = nibble j of word r)."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    codes = (packed.unsqueeze(1) >> shifts[None, :, None]) & 0xF  # [R, 8, C]
    return codes.reshape(-1, packed.shape[1])


def pack4_rows(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of ``unpack4_rows``: int codes [8R, C] in [0, 16) -> int32 [R, C]."""
    if codes.shape[0] % 8:
        raise ValueError(f"rows to pack ({codes.shape[0]}) must be a multiple of 8")
    c = codes.to(torch.int64).reshape(-1, 8, codes.shape[1])
    shifts = torch.arange(0, 32, 4, device=codes.device, dtype=torch.int64)
    words = (c << shifts[None, :, None]).sum(dim=1)  # disjoint nibbles: sum == bitwise or
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def prepare_act_order(
    qweight: torch.Tensor, g_idx: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One-time row permutation making g_idx monotone: returns ``(qweight_sorted, perm or None)``.

    ``perm`` (int64 [K]) is what the kernels gather from x's columns; None when
    g_idx is already ``arange(K) // group_size`` (nothing to do).
    """
    k = qweight.shape[0] * 8
    if g_idx.shape != (k,):
        raise ValueError(f"g_idx must have K={k} entries, got shape {tuple(g_idx.shape)}")
    g = g_idx.to(torch.int64)
    want = torch.arange(k, device=g.device) // group_size
    if torch.equal(g, want):
        return qweight, None
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], want):
        raise ValueError(
            f"g_idx does not sort into equal groups of {group_size} rows; the W4A16 kernels cannot use it "
            "(use gptq_dequant.gptq_linear)"
        )
    return pack4_rows(unpack4_rows(qweight)[perm]), perm.to(qweight.device)


@dataclass(frozen=True)
class PackedW4:
    """Kernel-ready 4-bit weight: monotone-g_idx tensors plus the act-order permutation (or None)."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    perm: torch.Tensor | None
    group_size: int
    locks: torch.Tensor | None = None
    """Zeroed int32 semaphores for the GEMV kernel's "fixup" and "atomic_last" modes (the kernel re-zeroes them)."""
    acc: torch.Tensor | None = None
    """Zeroed fp32 [N] row the M = 1 GEMV's "atomic_last" mode sums into (the kernel re-zeroes it)."""

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * 8

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]


def lock_count(n: int) -> int:
    """Semaphores ``prepare_w4`` allocates: one per 16-column tile (enough for any block_n >= 16, M <= 16)."""
    return max(1, -(-n // 16))


def prepare_w4(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None, group_size: int
) -> PackedW4:
    """Validate a 4-bit GPTQ checkpoint's tensors once and make them kernel-ready (``group_size=-1``: per-channel)."""
    k = qweight.shape[0] * 8
    gs = k if group_size == -1 else group_size
    if gs < 1:
        raise ValueError(f"group_size must be -1 or >= 1, got {group_size}")
    if g_idx is None:
        g_idx = torch.arange(k, device=qweight.device) // gs
    qw, perm = prepare_act_order(qweight, g_idx, gs)
    check_w4(torch.empty(0, k), qw, qzeros, scales, gs)
    n = qw.shape[1]
    locks = torch.zeros(lock_count(n), device=qw.device, dtype=torch.int32)
    acc = torch.zeros(n, device=qw.device, dtype=torch.float32)
    return PackedW4(qw.contiguous(), qzeros.contiguous(), scales.contiguous(), perm, gs, locks, acc)
