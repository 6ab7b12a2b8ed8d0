"""Build a ForwardBatch (tensors) from a SchedulerOutput (plain lists).

Invariants: sequences keep the scheduler's order; tokens are flattened in that
order; ``logits_indices`` lists, in the same order, the last token of every
sequence with ``sample=True``. All index math happens once per step on the host
in vectorised torch ops, then the tensors move to the device in one copy each.
"""

from __future__ import annotations

import torch

from inlaid.core.outputs import SchedulerOutput
from inlaid.model.batch import ForwardBatch


def build_forward_batch(out: SchedulerOutput, block_size: int, device: torch.device) -> ForwardBatch:
    """Flatten the scheduled sequences of one step into model inputs."""
    seqs = out.scheduled
    q_lens = torch.tensor([len(s.token_ids) for s in seqs], dtype=torch.int64)
    starts = torch.tensor([s.start_pos for s in seqs], dtype=torch.int64)
    query_start_loc = torch.zeros(len(seqs) + 1, dtype=torch.int64)
    torch.cumsum(q_lens, 0, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])

    seq_index = torch.repeat_interleave(torch.arange(len(seqs)), q_lens)
    positions = starts[seq_index] + (torch.arange(num_tokens) - query_start_loc[:-1][seq_index])

    max_blocks = max(len(s.block_ids) for s in seqs)
    block_tables = torch.zeros(len(seqs), max_blocks, dtype=torch.int64)
    for i, s in enumerate(seqs):
        block_tables[i, : len(s.block_ids)] = torch.tensor(s.block_ids, dtype=torch.int64)
    block_of_token = block_tables[seq_index, positions // block_size]
    slot_mapping = block_of_token * block_size + positions % block_size

    lora_slots = torch.tensor([s.adapter_slot for s in seqs], dtype=torch.int64)[seq_index]
    sample_rows = [i for i, s in enumerate(seqs) if s.sample]
    logits_indices = query_start_loc[1:][sample_rows] - 1
    seq_lens = starts + q_lens

    def dev(t: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return t.to(device=device, dtype=dtype, non_blocking=True)

    return ForwardBatch(
        input_ids=dev(torch.tensor([t for s in seqs for t in s.token_ids], dtype=torch.int64)),
        positions=dev(positions),
        slot_mapping=dev(slot_mapping),
        query_start_loc=dev(query_start_loc, torch.int32),
        seq_lens=dev(seq_lens, torch.int32),
        block_tables=dev(block_tables, torch.int32),
        lora_slots=dev(lora_slots),
        logits_indices=dev(logits_indices),
        max_query_len=int(q_lens.max()),
        max_seq_len=int(seq_lens.max()),
    )
