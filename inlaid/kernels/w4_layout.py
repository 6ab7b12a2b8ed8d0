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

Tensor-core layout (``PackedW4.layout == "tc"``; ``to_tc_layout`` / ``from_tc_layout``): the same int32 words
and ``[K/8, N]`` shape, stored as ``[K/128, N, 16]``: 128-row step s, column n holds 16 contiguous words, and
word c = 4t + v (t, v < 4) nibble j = 4*j2 + 2*j1 + j0 (j's bits) holds input row
``128s + j2 + 2t + 8j0 + 16j1 + 32v``. Why (``w4a16_tcl``): a thread that loads 4 consecutive words of a column
and unpacks each with one LOP3 per nibble pair (j, j + 4) holds exactly the (k, k + 1) pairs that wgmma's
register operand A wants at lane t (k = 2t, 2t + 1, 2t + 8, 2t + 9 of each 16-row slice), so the unpacked
weights feed the tensor cores without a shared-memory relayout; and each step of a column tile is one
contiguous read. Used on CUDA where K and the group size are multiples of 128 (``tc_layout_fits``).

Invariants of a ``PackedW4`` (what the kernels rely on):
- the group of input row k is ``k // group_size`` ("monotone" g_idx); the last
  group may be partial (K % group_size != 0, allowed by the GPTQ format);
- act-order checkpoints were made monotone once by ``prepare_act_order``: rows
  of ``qweight`` permuted so that the sorted g_idx is ``arange(K)//group_size``;
  the kernels gather ``x[:, perm]`` per call (``x[:, perm] @ W[perm] == x @ W``);
- tensors are contiguous; ``locks`` is a zeroed int32 buffer the GEMV "fixup"
  and "atomic_last" modes use as per-tile semaphores, ``acc`` a zeroed fp32
  [N] row the M = 1 atomic modes sum into (the kernel, or the "atomic"
  mode's finish, ``cast_sums`` or a ``PendingSums`` taker, leaves both
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


TC_STEP = 128
"""Input rows per step of the tensor-core layout (16 words per column)."""


def tc_layout_fits(k: int, group_size: int) -> bool:
    """True when a [K, N] 4-bit weight can be stored in the tensor-core layout: whole 128-row steps, each inside
    one quantization group (the kernels scale a step's product once)."""
    return k % TC_STEP == 0 and kernel_group_size(group_size, k) % TC_STEP == 0


def _tc_rows() -> torch.Tensor:
    """int64 [16, 8]: the input row (within its step) of word c, nibble j in the tensor-core layout."""
    c, j = torch.arange(16)[:, None], torch.arange(8)[None, :]
    return (j // 4) + 2 * (c // 4) + 8 * (j % 2) + 16 * ((j // 2) % 2) + 32 * (c % 4)


_CONVERT_CODES = 1 << 22
"""Codes per chunk of a layout conversion, so its int32/int64 temporaries stay near 100 MB however large the
weight. ``to_tc_layout`` of a 4096 x 11008 weight on the CPU (peak RSS rise, ``resource.getrusage``): 1,081 MB
whole (25 bytes a code; a 28672 x 8192 weight would take ~5.9 GB), 168 MB by chunks."""


def _step_chunks(kw: int, n: int) -> range:
    """Start steps of the chunks a [K/8, N] conversion walks (whole 128-row steps)."""
    return range(0, kw // 16, max(1, _CONVERT_CODES // (TC_STEP * n)))


def to_tc_layout(qweight: torch.Tensor) -> torch.Tensor:
    """GPTQ ``qweight`` [K/8, N] (row k = nibble k % 8 of word k // 8) -> the tensor-core layout (module
    docstring), same shape and dtype; K must be a multiple of 128. Converted a chunk of steps at a time."""
    kw, n = qweight.shape
    if qweight.dtype != torch.int32 or (kw * 8) % TC_STEP:
        raise ValueError(f"to_tc_layout needs int32 [K/8, N] with K a multiple of {TC_STEP}, got "
                         f"{qweight.dtype} {tuple(qweight.shape)}")
    picks = _tc_rows().to(qweight.device).reshape(-1)
    out = torch.empty(kw // 16, n, 16, dtype=torch.int32, device=qweight.device)
    chunks = _step_chunks(kw, n)
    for s0 in chunks:
        codes = unpack4_rows(qweight[s0 * 16:(s0 + chunks.step) * 16]).reshape(-1, TC_STEP, n)  # [steps, row, N]
        words = pack4_rows(codes[:, picks, :].reshape(-1, n)).reshape(-1, 16, n)  # nibble j of word c
        out[s0:s0 + chunks.step] = words.transpose(1, 2)  # [steps, N, 16] in memory
    return out.view(kw, n)


def from_tc_layout(qtc: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_tc_layout``: the GPTQ [K/8, N] words (a chunk of steps at a time)."""
    kw, n = qtc.shape
    picks = _tc_rows().to(qtc.device).reshape(-1)
    shifts = torch.arange(0, 32, 4, device=qtc.device, dtype=torch.int32)
    steps = qtc.contiguous().view(kw // 16, n, 16)
    out = torch.empty(kw, n, dtype=torch.int32, device=qtc.device)
    chunks = _step_chunks(kw, n)
    for s0 in chunks:
        words = steps[s0:s0 + chunks.step].transpose(1, 2)  # [steps, 16 (c), N]
        codes = ((words.unsqueeze(2) >> shifts[None, None, :, None]) & 0xF).reshape(-1, TC_STEP, n)
        rows = torch.empty_like(codes)
        rows[:, picks, :] = codes
        out[s0 * 16:(s0 + chunks.step) * 16] = pack4_rows(rows.reshape(-1, n))
    return out


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
    """Zeroed fp32 [N] row the M = 1 launches' atomic modes sum into (re-zeroed by the last tile program in
    "atomic_last", by the finish of "atomic": ``cast_sums`` or the kernel that takes the ``PendingSums``)."""
    layout: str = "gptq"
    """Word order of ``qweight``: "gptq" (the checkpoint's) or "tc" (the tensor-core layout, module docstring)."""

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
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None, group_size: int,
    layout: str = "gptq",
) -> PackedW4:
    """Validate a 4-bit GPTQ checkpoint's tensors once and make them kernel-ready (``group_size=-1``: per-channel).

    ``layout``: "gptq" keeps the checkpoint's word order; "tc" stores the tensor-core layout (module docstring;
    ValueError unless ``tc_layout_fits``). ``w4a16_gemm.prepare_w4`` chooses it on CUDA where it fits."""
    k = qweight.shape[0] * 8
    gs = k if group_size == -1 else group_size
    if gs < 1:
        raise ValueError(f"group_size must be -1 or >= 1, got {group_size}")
    if layout not in ("gptq", "tc"):
        raise ValueError(f"layout must be 'gptq' or 'tc', got {layout!r}")
    if layout == "tc" and not tc_layout_fits(k, gs):
        raise ValueError(f"the tensor-core layout needs K ({k}) and the group size ({gs}) to be multiples of "
                         f"{TC_STEP}; use layout='gptq'")
    if g_idx is None:
        g_idx = torch.arange(k, device=qweight.device) // gs
    qw, perm = prepare_act_order(qweight, g_idx, gs)
    check_w4(torch.empty(0, k), qw, qzeros, scales, gs)
    n = qw.shape[1]
    locks = torch.zeros(lock_count(n), device=qw.device, dtype=torch.int32)
    acc = torch.zeros(n, device=qw.device, dtype=torch.float32)
    qw = to_tc_layout(qw) if layout == "tc" else qw.contiguous()
    return PackedW4(qw, qzeros.contiguous(), scales.contiguous(), perm, gs, locks, acc, layout)
