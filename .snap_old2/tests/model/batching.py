"""Test helpers: hand-built ForwardBatch objects and a tiny paged-sequence bookkeeper.

``make_batch([(tokens, start_pos, block_ids), ...], block_size)`` packs new
tokens of several sequences into one ForwardBatch exactly as the model runner
would (positions, slot mapping, block tables, query_start_loc, seq_lens).
``PagedSequences`` hands out shuffled, non-contiguous block ids so that tests
exercise real paging.
"""

from __future__ import annotations

import random

import torch

from inlaid.model.batch import ForwardBatch


def make_batch(items: list[tuple[list[int], int, list[int]]], block_size: int,
               device: str | torch.device = "cpu", lora_slots: list[int] | None = None) -> ForwardBatch:
    """items: per sequence (new token ids, absolute position of the first one, its block ids)."""
    ids, positions, slots, q_starts, seq_lens, tables, token_slots = [], [], [], [0], [], [], []
    for b, (tokens, start, blocks) in enumerate(items):
        end = start + len(tokens)
        assert len(blocks) * block_size >= end, "not enough blocks for the sequence"
        ids += tokens
        positions += list(range(start, end))
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(start, end)]
        q_starts.append(q_starts[-1] + len(tokens))
        seq_lens.append(end)
        tables.append(list(blocks))
        token_slots += [lora_slots[b] if lora_slots else -1] * len(tokens)
    width = max(len(t) for t in tables)
    as_long = dict(dtype=torch.int64, device=device)
    as_int = dict(dtype=torch.int32, device=device)
    return ForwardBatch(
        input_ids=torch.tensor(ids, **as_long),
        positions=torch.tensor(positions, **as_long),
        slot_mapping=torch.tensor(slots, **as_long),
        query_start_loc=torch.tensor(q_starts, **as_int),
        seq_lens=torch.tensor(seq_lens, **as_int),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], **as_int),
        lora_slots=torch.tensor(token_slots, **as_long),
        logits_indices=torch.tensor([q - 1 for q in q_starts[1:]], **as_long),
        max_query_len=max(len(t) for t, _, _ in items),
        max_seq_len=max(seq_lens),
    )


class PagedSequences:
    """Tracks sequences' lengths and blocks; blocks come from a shuffled pool (non-contiguous ids)."""

    def __init__(self, num_blocks: int, block_size: int, seed: int = 0) -> None:
        self.block_size = block_size
        self.free = list(range(num_blocks))  # block 0 too: it is also the table padding value
        random.Random(seed).shuffle(self.free)
        self.blocks: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def step_item(self, seq_id: int, tokens: list[int]) -> tuple[list[int], int, list[int]]:
        """Reserve room for ``tokens`` appended to ``seq_id``; return its make_batch item."""
        blocks = self.blocks.setdefault(seq_id, [])
        start = self.lens.get(seq_id, 0)
        end = start + len(tokens)
        while len(blocks) * self.block_size < end:
            blocks.append(self.free.pop())
        self.lens[seq_id] = end
        return tokens, start, list(blocks)
