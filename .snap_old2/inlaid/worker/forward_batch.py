"""Build a ForwardBatch (tensors) from a SchedulerOutput (plain lists).

Invariants: sequences keep the scheduler's order; tokens are flattened in that
order; ``logits_indices`` lists, in the same order, the last token of every
sequence with ``sample=True``.

Host cost (issue 8, per-step overhead): the index math happens once per step on
the host in numpy (a decode-only step, the common case, takes a short path with
no index math at all); a numpy call costs about a microsecond where a torch op
on a small CPU tensor costs several. On CPU the ForwardBatch tensors are views
of this step's fresh numpy arrays (no copy, nothing shared between steps). On
CUDA the int64 inputs are packed into one host array and the int32 ones into
another (each part on a 16-byte boundary), so a step makes exactly two
host->device copies, ``non_blocking`` from pinned staging buffers
(``HostStaging``); the ForwardBatch tensors are views into the two device arrays.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from inlaid.core.outputs import SchedulerOutput
from inlaid.model.batch import ForwardBatch


class HostStaging:
    """Reusable pinned host buffers for the two per-step uploads (CUDA only; CPU needs none).

    Double-buffered: a step writes the buffer pair the previous step did not use, and first waits on the
    event recorded after that pair's last copy, so the host never overwrites memory a copy may still read.
    The wait is normally free (every sampling step synchronises on its token copy anyway).
    """

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"HostStaging stages uploads to a CUDA device, got {device}")
        self.device = device
        self._bufs: list[dict[np.dtype, torch.Tensor]] = [{}, {}]
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def _buffer(self, pair: dict, dtype: np.dtype, n: int) -> torch.Tensor:
        buf = pair.get(dtype)
        if buf is None or buf.numel() < n:
            size = max(1024, 1 << (max(n, 1) - 1).bit_length())
            buf = torch.empty(size, dtype=torch.from_numpy(np.empty(0, dtype)).dtype, pin_memory=True)
            pair[dtype] = buf
        return buf

    def upload(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        """Copy each 1-D host array to the device (one non_blocking copy each) through pinned memory."""
        self._turn ^= 1
        event = self._events[self._turn]
        if event is not None:
            event.synchronize()
        pair = self._bufs[self._turn]
        out = []
        for arr in arrays:
            buf = self._buffer(pair, arr.dtype, arr.size)
            buf.numpy()[: arr.size] = arr
            out.append(buf[: arr.size].to(self.device, non_blocking=True))
        if event is None:
            event = self._events[self._turn] = torch.cuda.Event()
        event.record()
        return out


def _block_table(seqs: list, width: int) -> np.ndarray:
    """[B, width] int32 block ids, each row zero-padded past the sequence's blocks."""
    pad = [0] * width
    flat = np.fromiter(
        itertools.chain.from_iterable(itertools.chain(s.block_ids, pad[: width - len(s.block_ids)]) for s in seqs),
        dtype=np.int32, count=len(seqs) * width,
    )
    return flat.reshape(len(seqs), width)


def build_forward_batch(out: SchedulerOutput, block_size: int, device: torch.device,
                        staging: HostStaging | None = None) -> ForwardBatch:
    """Flatten the scheduled sequences of one step into model inputs (``staging``: pinned uploads on CUDA)."""
    return build_forward_inputs(out, block_size, device, staging)[0]


def build_forward_inputs(out: SchedulerOutput, block_size: int, device: torch.device,
                         staging: HostStaging | None = None) -> tuple[ForwardBatch, np.ndarray]:
    """``build_forward_batch`` plus the host copy of ``lora_slots`` ([T] int64: LoRA metadata without a read-back)."""
    seqs = out.scheduled
    lens = [len(s.token_ids) for s in seqs]
    arrays = _decode_arrays(seqs, block_size) if max(lens) == 1 else _mixed_arrays(seqs, lens, block_size)
    i64 = [arrays[k] for k in _I64]
    i32 = [arrays[k] for k in _I32]
    if device.type == "cpu":  # views of this step's fresh arrays: no copy
        t64 = [torch.from_numpy(a) for a in i64]
        t32 = [torch.from_numpy(a) for a in i32]
    else:  # two copies (pinned + non_blocking with ``staging``), then views
        (p64, o64), (p32, o32) = _pack(i64, np.int64), _pack(i32, np.int32)
        d64, d32 = staging.upload(p64, p32) if staging is not None else \
            (torch.from_numpy(a).to(device, non_blocking=True) for a in (p64, p32))
        t64 = [d64[a:b] for a, b in o64]
        t32 = [d32[a:b] for a, b in o32]
    tensors = dict(zip(_I64 + _I32, t64 + t32))
    n = len(seqs)
    tensors["block_tables"] = tensors["block_tables"].view(n, arrays["block_tables"].size // max(n, 1))
    batch = ForwardBatch(**tensors, max_query_len=max(lens), max_seq_len=int(arrays["seq_lens"].max()))
    return batch, arrays["lora_slots"]


_I64 = ("input_ids", "positions", "slot_mapping", "lora_slots", "logits_indices")
_I32 = ("query_start_loc", "seq_lens", "block_tables")


def _decode_arrays(seqs: list, block_size: int) -> dict[str, np.ndarray]:
    """Host inputs of a decode-only step (token i belongs to sequence i): few numpy calls, no index math."""
    n = len(seqs)
    starts = [s.start_pos for s in seqs]
    width = max(len(s.block_ids) for s in seqs)
    positions = np.array(starts, dtype=np.int64)
    return {
        "input_ids": np.array([s.token_ids[0] for s in seqs], dtype=np.int64),
        "positions": positions,
        "slot_mapping": np.array([s.block_ids[p // block_size] * block_size + p % block_size
                                  for s, p in zip(seqs, starts)], dtype=np.int64),
        "lora_slots": np.array([s.adapter_slot for s in seqs], dtype=np.int64),
        "logits_indices": np.array([i for i, s in enumerate(seqs) if s.sample], dtype=np.int64),
        "query_start_loc": np.arange(n + 1, dtype=np.int32),
        "seq_lens": (positions + 1).astype(np.int32),
        "block_tables": _block_table(seqs, width).ravel(),
    }


def _mixed_arrays(seqs: list, lens: list[int], block_size: int) -> dict[str, np.ndarray]:
    """Host inputs of a step with prefill chunks: vectorised index math over the flattened tokens."""
    n = len(seqs)
    q_lens = np.array(lens, dtype=np.int64)
    starts = np.array([s.start_pos for s in seqs], dtype=np.int64)
    query_start_loc = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(q_lens, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])
    seq_index = np.repeat(np.arange(n), q_lens)
    positions = starts[seq_index] + (np.arange(num_tokens) - query_start_loc[:-1][seq_index])
    block_tables = _block_table(seqs, max(len(s.block_ids) for s in seqs))
    slot_mapping = block_tables[seq_index, positions // block_size].astype(np.int64) * block_size \
        + positions % block_size
    sample_rows = [i for i, s in enumerate(seqs) if s.sample]
    return {
        "input_ids": np.fromiter(itertools.chain.from_iterable(s.token_ids for s in seqs), dtype=np.int64,
                                 count=num_tokens),
        "positions": positions,
        "slot_mapping": slot_mapping,
        "lora_slots": np.array([s.adapter_slot for s in seqs], dtype=np.int64)[seq_index],
        "logits_indices": query_start_loc[1:][sample_rows] - 1,
        "query_start_loc": query_start_loc.astype(np.int32),
        "seq_lens": (starts + q_lens).astype(np.int32),
        "block_tables": block_tables.ravel(),
    }


def _pack(parts: list[np.ndarray], dtype: type) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Concatenate 1-D arrays as ``dtype``, each starting at a 16-byte boundary; returns (array, [(lo, hi)])."""
    align = 16 // np.dtype(dtype).itemsize
    spans, pos = [], 0
    for p in parts:
        spans.append((pos, pos + p.size))
        pos += -(-p.size // align) * align
    flat = np.zeros(max(pos, 1), dtype=dtype)
    for p, (lo, hi) in zip(parts, spans):
        flat[lo:hi] = p
    return flat, spans
