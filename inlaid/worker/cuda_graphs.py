"""CUDA graphs for decode-only steps: static input buffers, batch padding, capture and replay.

Owns the graphs of the model's decode forward at the batch sizes
``CAPTURE_SIZES`` (a step of B sequences replays the graph of the smallest
captured size >= B) and the static tensors they read. Prefill and mixed steps
never come here (the ModelRunner runs them eagerly); the scheduler is unchanged.

Invariants:
- A graph reads only the static buffers of ``StaticDecodeBuffers`` (allocated
  once for the largest size); ``fill`` copies a step's tensors into their first
  B rows and pads the rest: token 0 at position 0, K/V written to the reserved
  scratch block ``scratch_block`` (never handed to the scheduler), ``seq_len``
  0 (attention returns 0 for that row), LoRA slot -1 (no delta), an all-scratch
  block-table row. Padding rows therefore never touch a real sequence's cache.
  ``fill`` re-pads only rows a previous step may have filled (host cost: no
  padding launches while the batch size stays put).
- ``block_tables`` are padded to ``max_blocks`` columns and attention is told
  a fixed ``max_seq_len`` bound per graph (its split count depends only on
  that bound, never on the step's data): ``max_blocks * block_size``, or, for
  a step whose longest context fits ``short_bound(size)`` (the longest context
  the decode attention runs in one partition at that size), that shorter
  bound, so short contexts replay a graph without the attention's combine
  launch (``graph_bound``). The kernel reads each sequence's own length, so
  either graph is correct for any context; the bound only picks the split.
- Graphs are keyed by (size, bound, LoRA active, weights version): capturing
  while no adapter is loaded skips every LoRA launch. A GPTQ hot-swap copies into the
  linears' buffers (same storage), so the graphs stay valid; only a swap that
  must allocate new tensors bumps ``GPTQLinearMethod.version``, and then the
  old graphs are dropped and re-captured.
- Capture runs the forward once eagerly on the padded static batch first
  (Triton compiles, lazy one-time preparations happen outside the graph).
  Capture and the eager fallback run inside ``decode_batch(size)``, so the
  kernels' launch options (the ``auto`` PDL mode) depend only on the graph's
  size, never on which batch happened to trigger the capture.
- Capture vs. other threads (the re-quantization worker issues CUDA work from
  its own thread while the engine serves): captures use
  ``capture_error_mode="thread_local"`` and only run while ``capture_lock`` is
  free. ``"global"`` (torch's default) makes an unsafe CUDA call of ANY thread
  during a capture (the worker's ``cudaMalloc``, stream sync, ``.cpu()``) fail
  and invalidate the capture; ``"thread_local"`` restricts that to the
  capturing thread (PyTorch documents it for this case). Calls that conflict
  with a capture in every mode (a device-wide sync, the legacy default stream,
  a library's lazy ``cudaFree``) are kept out by the lock: a worker holds
  ``capture_lock`` around each of its GPU work units, and ``run`` takes it
  without waiting; when it is held, a step whose graph would have to be
  captured runs the same forward eagerly on the static buffers instead (no
  stall; the capture happens at a later step). Replays need no lock.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import torch

from inlaid.kernels._triton import decode_batch
from inlaid.model.batch import ForwardBatch

logger = logging.getLogger(__name__)

CAPTURE_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)


def padded_size(num_seqs: int, sizes: tuple[int, ...] = CAPTURE_SIZES) -> int | None:
    """Smallest captured size >= ``num_seqs`` (None when the batch is larger than every size)."""
    if num_seqs < 1:
        raise ValueError(f"a decode batch has at least one sequence, got {num_seqs}")
    return next((s for s in sorted(sizes) if s >= num_seqs), None)


def graph_bound(max_seq_len: int, full_bound: int, short_bound: int | None) -> int:
    """The ``max_seq_len`` bound of the graph a step with this longest context replays: ``short_bound`` where the
    context fits it and it is below the full bound (there the attention is not split), else ``full_bound``."""
    if short_bound is not None and max_seq_len <= short_bound < full_bound:
        return short_bound
    return full_bound


class StaticDecodeBuffers:
    """The fixed-address inputs of every decode graph, sized for ``max_size`` sequences."""

    def __init__(self, max_size: int, max_blocks: int, block_size: int, scratch_block: int,
                 device: torch.device) -> None:
        if max_size < 1 or max_blocks < 1 or block_size < 1 or scratch_block < 0:
            raise ValueError(f"bad static buffer geometry: size {max_size}, blocks {max_blocks}, "
                             f"block_size {block_size}, scratch block {scratch_block}")
        self.max_size, self.max_blocks, self.block_size = max_size, max_blocks, block_size
        self.scratch_block = scratch_block
        i64 = dict(device=device, dtype=torch.int64)
        self.input_ids = torch.zeros(max_size, **i64)
        self.positions = torch.zeros(max_size, **i64)
        self.slot_mapping = torch.full((max_size,), scratch_block * block_size, **i64)
        self.lora_slots = torch.full((max_size,), -1, **i64)
        self.logits_indices = torch.arange(max_size, **i64)
        self.query_start_loc = torch.arange(max_size + 1, device=device, dtype=torch.int32)
        self.seq_lens = torch.zeros(max_size, device=device, dtype=torch.int32)
        self.block_tables = torch.full((max_size, max_blocks), scratch_block, device=device, dtype=torch.int32)
        self._dirty = 0
        """Every row >= this holds padding (rows below may hold a sequence): ``fill`` pads only rows it must."""

    @property
    def max_seq_len(self) -> int:
        return self.max_blocks * self.block_size

    def view(self, size: int, max_seq_len: int | None = None) -> ForwardBatch:
        """The static ForwardBatch of ``size`` rows (what a graph of that size is captured on), telling attention
        ``max_seq_len`` (default: the full bound ``max_blocks * block_size``)."""
        return ForwardBatch(
            input_ids=self.input_ids[:size], positions=self.positions[:size], slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1], seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size], lora_slots=self.lora_slots[:size],
            logits_indices=self.logits_indices[:size], max_query_len=1, max_seq_len=max_seq_len or self.max_seq_len,
        )

    def reset(self) -> None:
        """Every row padding (what capture runs on: it writes only the scratch block)."""
        self.input_ids.zero_()
        self.positions.zero_()
        self.slot_mapping.fill_(self.scratch_block * self.block_size)
        self.lora_slots.fill_(-1)
        self.seq_lens.zero_()
        self.block_tables.fill_(self.scratch_block)
        self._dirty = 0

    def fill(self, batch: ForwardBatch, size: int, max_seq_len: int | None = None) -> ForwardBatch:
        """Copy a decode batch of B <= size sequences into rows 0..B-1, pad rows B..size-1; returns
        ``view(size, max_seq_len)``."""
        b = batch.num_seqs
        if not batch.is_decode_only or batch.num_tokens != b:
            raise ValueError("only decode-only batches (one token per sequence) can replay a CUDA graph")
        if not b <= size <= self.max_size or batch.block_tables.shape[1] > self.max_blocks:
            raise ValueError(f"batch of {b} seqs x {batch.block_tables.shape[1]} blocks does not fit graph size "
                             f"{size} (max {self.max_size} x {self.max_blocks} blocks)")
        w = batch.block_tables.shape[1]
        self.input_ids[:b].copy_(batch.input_ids)
        self.positions[:b].copy_(batch.positions)
        self.slot_mapping[:b].copy_(batch.slot_mapping)
        self.lora_slots[:b].copy_(batch.lora_slots)
        self.seq_lens[:b].copy_(batch.seq_lens)
        self.block_tables[:b, :w].copy_(batch.block_tables)
        hi = min(size, self._dirty)
        if b < hi:  # pad: rows from a previous, larger step must not leak into this one
            self.input_ids[b:hi].zero_()
            self.positions[b:hi].zero_()
            self.slot_mapping[b:hi].fill_(self.scratch_block * self.block_size)
            self.lora_slots[b:hi].fill_(-1)
            self.seq_lens[b:hi].zero_()
            self.block_tables[b:hi].fill_(self.scratch_block)
        self._dirty = self._dirty if self._dirty > size else b
        return self.view(size, max_seq_len)


class CudaGraphRunner:
    """Captures (lazily, per size) and replays the model's decode forward; see the module docstring."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], max_blocks: int, block_size: int,
                 scratch_block: int, device: torch.device, sizes: tuple[int, ...] = CAPTURE_SIZES,
                 lora_active: Callable[[], bool] = lambda: False, weights_version: Callable[[], int] = lambda: 0,
                 short_bound: Callable[[int], int | None] = lambda size: None) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.model, self.kv_caches, self.sizes = model, kv_caches, tuple(sorted(sizes))
        self.buffers = StaticDecodeBuffers(self.sizes[-1], max_blocks, block_size, scratch_block, device)
        self.lora_active, self.weights_version = lora_active, weights_version
        self.short_bounds = {size: short_bound(size) for size in self.sizes}
        """``short_bound`` of each captured size, computed once (``run`` asks on every step)."""
        self.graphs: dict[tuple[int, int, bool, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None  # graph memory pool shared by all sizes (handle from the first capture)
        self._version: int | None = None
        self.capture_lock = threading.Lock()
        """Held by a capture here and by other threads' GPU work units (see the module docstring)."""
        self.eager_fallbacks = 0
        """Steps that ran eagerly because ``capture_lock`` was held when their graph had to be captured."""

    def can_run(self, batch: ForwardBatch) -> bool:
        return (batch.is_decode_only and batch.num_tokens == batch.num_seqs and batch.num_seqs <= self.sizes[-1]
                and batch.block_tables.shape[1] <= self.buffers.max_blocks)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Hidden states [B, hidden] of a decode batch (replay; capture first if this key is new)."""
        size = padded_size(batch.num_seqs, self.sizes)
        bound = graph_bound(batch.max_seq_len, self.buffers.max_seq_len, self.short_bounds[size])
        key = (size, bound, bool(self.lora_active()), int(self.weights_version()))
        if self._version is not None and key[3] != self._version:
            # Weights were swapped: every graph points at old tensors. Dropping the graphs releases their memory
            # pool, so its handle must go too: capturing into a released pool fails an allocator assertion.
            self.graphs.clear()
            self.pool = None
        self._version = key[3]
        if key not in self.graphs:
            with decode_batch(size):  # the launch options (PDL mode) baked into a graph follow its size only
                if not self.capture_lock.acquire(blocking=False):  # another thread's GPU work: no capture now
                    self.eager_fallbacks += 1
                    return self.model(self.buffers.fill(batch, size, bound), self.kv_caches)[: batch.num_seqs]
                try:
                    self.graphs[key] = self._capture(size, bound)
                finally:
                    self.capture_lock.release()
        graph, out = self.graphs[key]
        self.buffers.fill(batch, size, bound)
        graph.replay()
        return out[: batch.num_seqs]

    def _capture(self, size: int, bound: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self.buffers.reset()
        static = self.buffers.view(size, bound)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile kernels and run lazy preparations outside the graph
                self.model(self.buffers.view(size, bound), self.kv_caches)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self.model(static, self.kv_caches)
        if self.pool is None:
            self.pool = graph.pool()
        logger.info("captured decode CUDA graph for batch size %d, contexts up to %d", size, bound)
        return graph, out
