"""Per-step input building after the host-overhead work (issue 8) gives exactly what it gave before.

- ``build_forward_batch`` (numpy, decode fast path, packed uploads) equals an independent torch reference (the
  pre-change implementation, kept here) on random decode-only and mixed prefill/decode steps: every tensor,
  dtype and shape; consecutive CPU batches share no memory.
- ``host_segments`` (LoRA segments from the host copy of the slots) equals ``build_segments`` field by field.
- ``LoRAPool.prepare`` keeps host-built segments only for the very batch they were built for, and
  ``has_adapters`` follows load/clear.
- ``StaticDecodeBuffers.fill`` with its dirty-row tracking leaves the graph's view exactly as a fill into fresh
  buffers would, over random sequences of batch/graph sizes.
- ``HostStaging`` (CUDA, ``gpu``): uploads equal plain copies over many rounds, buffers growing.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from inlaid.core.outputs import ScheduledSeq, SchedulerOutput
from inlaid.kernels.lora_sgmv import build_segments
from inlaid.lora.pool import LoRAPool, host_segments
from inlaid.lora.synthetic import random_adapter
from inlaid.sampling import SamplingParams
from inlaid.worker.cuda_graphs import StaticDecodeBuffers
from inlaid.worker.forward_batch import build_forward_batch, build_forward_inputs

FIELDS = ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens", "block_tables", "lora_slots",
          "logits_indices")


def reference_batch(out: SchedulerOutput, block_size: int) -> dict:
    """The torch implementation build_forward_batch had before the numpy rewrite (CPU)."""
    seqs = out.scheduled
    q_lens = torch.tensor([len(s.token_ids) for s in seqs], dtype=torch.int64)
    starts = torch.tensor([s.start_pos for s in seqs], dtype=torch.int64)
    qsl = torch.zeros(len(seqs) + 1, dtype=torch.int64)
    torch.cumsum(q_lens, 0, out=qsl[1:])
    seq_index = torch.repeat_interleave(torch.arange(len(seqs)), q_lens)
    positions = starts[seq_index] + (torch.arange(int(qsl[-1])) - qsl[:-1][seq_index])
    tables = torch.zeros(len(seqs), max(len(s.block_ids) for s in seqs), dtype=torch.int64)
    for i, s in enumerate(seqs):
        tables[i, : len(s.block_ids)] = torch.tensor(s.block_ids, dtype=torch.int64)
    slot_mapping = tables[seq_index, positions // block_size] * block_size + positions % block_size
    rows = [i for i, s in enumerate(seqs) if s.sample]
    return dict(
        input_ids=torch.tensor([t for s in seqs for t in s.token_ids], dtype=torch.int64), positions=positions,
        slot_mapping=slot_mapping, query_start_loc=qsl.to(torch.int32), seq_lens=(starts + q_lens).to(torch.int32),
        block_tables=tables.to(torch.int32),
        lora_slots=torch.tensor([s.adapter_slot for s in seqs], dtype=torch.int64)[seq_index],
        logits_indices=qsl[1:][rows] - 1, max_query_len=int(q_lens.max()), max_seq_len=int((starts + q_lens).max()),
    )


def random_step(rng: random.Random, n: int, prefill: bool, block_size: int) -> SchedulerOutput:
    seqs = []
    for i in range(n):
        q = rng.randint(1, 9) if prefill and rng.random() < 0.6 else 1
        start = rng.randint(0, 60)
        blocks = rng.sample(range(500), -(-(start + q) // block_size) + rng.randint(0, 2))
        seqs.append(ScheduledSeq(f"r{i}", [rng.randrange(1000) for _ in range(q)], start, blocks,
                                 rng.choice([-1, 0, 1, 3]), rng.random() < 0.7 or q == 1, SamplingParams()))
    return SchedulerOutput(scheduled=seqs)


@pytest.mark.parametrize("prefill", [False, True])
def test_forward_batch_equals_the_torch_reference(prefill: bool) -> None:
    rng = random.Random(7)
    for n in (1, 2, 5, 32, 77):
        out = random_step(rng, n, prefill, 4)
        got, host_slots = build_forward_inputs(out, 4, torch.device("cpu"))
        want = reference_batch(out, 4)
        for f in FIELDS:
            g, w = getattr(got, f), want[f]
            assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w), (n, f, g, w)
        assert (got.max_query_len, got.max_seq_len) == (want["max_query_len"], want["max_seq_len"])
        assert np.array_equal(host_slots, want["lora_slots"].numpy())


def test_cpu_batches_share_no_memory_between_steps() -> None:
    out = random_step(random.Random(1), 8, False, 4)
    a, b = (build_forward_batch(out, 4, torch.device("cpu")) for _ in range(2))
    a.input_ids.fill_(-5)
    a.block_tables.fill_(-5)
    assert torch.equal(b.input_ids, reference_batch(out, 4)["input_ids"])
    assert torch.equal(b.block_tables, reference_batch(out, 4)["block_tables"])


def test_host_segments_equal_build_segments() -> None:
    rng = random.Random(3)
    cases = [[], [-1, -1], [2], [0, 0, 1, 1], [1, 0, 1, 0, -1], [3, -1, 3, 3, 0]]
    cases += [[rng.choice([-1, 0, 1, 2, 5]) for _ in range(rng.randint(1, 40))] for _ in range(50)]
    cases += [[-1] * 300, [4] * 300, sorted(rng.choice([-1, 0, 3]) for _ in range(400))]  # the numpy path (> 256)
    cases += [[rng.choice([-1, 0, 1, 2, 5]) for _ in range(rng.randint(257, 900))] for _ in range(10)]
    for slots in cases:
        want = build_segments(torch.tensor(slots, dtype=torch.int64))
        got = host_segments(np.array(slots, dtype=np.int64), torch.device("cpu"))
        assert (got.slots, got.starts, got.contiguous, got.num_tokens) == \
            (want.slots, want.starts, want.contiguous, want.num_tokens), slots
        assert all(type(v) is int for v in got.slots + got.starts + got.contiguous)
        assert got.token_order.dtype == want.token_order.dtype and torch.equal(got.token_order, want.token_order)


def _pool() -> LoRAPool:
    shapes = {"q_proj": (8, 8), "v_proj": (8, 4)}
    pool = LoRAPool(3, 4, 1, shapes)
    pool.load(0, random_adapter("a", shapes, 1, 4, seed=0))
    return pool


def test_pool_keeps_host_segments_only_for_their_batch() -> None:
    pool = _pool()
    out = SchedulerOutput(scheduled=[ScheduledSeq("r", [1, 2, 3], 0, [0], 0, True, SamplingParams())])
    batch, host = build_forward_inputs(out, 4, torch.device("cpu"))
    pool.prepare(batch, host)
    meta = batch.lora_meta
    pool.prepare(batch)  # the model's own call at the start of the forward: keeps them
    assert batch.lora_meta is meta and meta.slots == (0,)
    batch.lora_slots = torch.tensor([-1, -1, -1])  # a caller re-pointing the slots gets fresh segments
    pool.prepare(batch)
    assert batch.lora_meta is not meta and batch.lora_meta.slots == ()
    bad, host = build_forward_inputs(SchedulerOutput(scheduled=[ScheduledSeq(
        "r", [1], 0, [0], 2, True, SamplingParams())]), 4, torch.device("cpu"))
    with pytest.raises(ValueError, match="no adapter loaded"):
        pool.prepare(bad, host)


def test_pool_has_adapters_follows_load_and_clear() -> None:
    pool = _pool()
    assert pool.has_adapters
    pool.load(0, random_adapter("b", {"q_proj": (8, 8)}, 1, 2, seed=1))  # replace: still one
    pool.load(2, random_adapter("c", {"q_proj": (8, 8)}, 1, 2, seed=2))
    pool.clear(0)
    pool.clear(0)  # clearing an empty slot changes nothing
    assert pool.has_adapters
    pool.clear(2)
    assert not pool.has_adapters and pool.slot_names == [None, None, None]


def _decode(rng: random.Random, b: int, width: int) -> SchedulerOutput:
    return SchedulerOutput(scheduled=[ScheduledSeq(
        f"r{i}", [rng.randrange(100)], rng.randint(0, 4 * width - 1), rng.sample(range(40), width),
        rng.choice([-1, 0, 2]), True, SamplingParams()) for i in range(b)])


def test_fill_with_dirty_rows_equals_a_fresh_fill() -> None:
    rng = random.Random(11)
    kw = dict(max_size=16, max_blocks=6, block_size=4, scratch_block=50, device=torch.device("cpu"))
    bufs = StaticDecodeBuffers(**kw)
    for _ in range(60):
        size = rng.choice([1, 2, 4, 8, 16])
        b = rng.randint(1, size)
        batch = build_forward_batch(_decode(rng, b, rng.randint(1, 6)), 4, torch.device("cpu"))
        got = bufs.fill(batch, size)
        fresh = StaticDecodeBuffers(**kw)
        want = fresh.fill(batch, size)
        w = batch.block_tables.shape[1]
        for f in ("input_ids", "positions", "slot_mapping", "lora_slots", "seq_lens"):
            assert torch.equal(getattr(got, f), getattr(want, f)), f
        assert torch.equal(got.block_tables[:, :w], want.block_tables[:, :w])
        assert got.block_tables[b:].eq(50).all()  # padding rows: all scratch (columns past w of real rows unread)


@pytest.mark.gpu
def test_host_staging_uploads_equal_plain_copies() -> None:
    from inlaid.worker.forward_batch import HostStaging

    staging = HostStaging(torch.device("cuda"))
    rng = np.random.default_rng(0)
    kept = []
    for i in range(20):
        n = int(rng.integers(1, 5000 if i % 5 == 4 else 64))
        a, b = rng.integers(-9, 9, n).astype(np.int64), rng.integers(-9, 9, n + 3).astype(np.int32)
        da, db = staging.upload(a, b)
        kept.append((a.copy(), b.copy(), da, db))
    torch.cuda.synchronize()
    for a, b, da, db in kept:  # earlier uploads were not overwritten by later rounds
        assert np.array_equal(da.cpu().numpy(), a) and np.array_equal(db.cpu().numpy(), b)
