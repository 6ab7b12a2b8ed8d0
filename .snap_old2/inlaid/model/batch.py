"""ForwardBatch: the tensors one model forward consumes (built by worker/ModelRunner).

A step packs T new tokens from B sequences, flattened in sequence order:
sequence b owns tokens ``query_start_loc[b] : query_start_loc[b+1]``. Prefill
chunks and single decode tokens mix freely.

Invariants (all tensors on the model's device):
- ``input_ids``, ``positions``, ``slot_mapping``, ``lora_slots``: shape [T], int64.
- ``positions[t]`` is the absolute position of token t in its sequence.
- ``slot_mapping[t] = block_id * block_size + offset`` is where token t's K/V are
  written in the paged cache (flat slot index).
- ``seq_lens[b]`` = tokens in cache for sequence b *after* this step (context + new).
- ``block_tables``: [B, max_blocks] int32, padded with 0 past each sequence's blocks
  (never read: attention masks by ``seq_lens``).
- ``lora_slots[t]`` is the adapter slot of token t's sequence, -1 for none.
- ``logits_indices``: [S] int64, rows of the hidden states whose logits are needed
  (the last token of each sequence that samples this step), in scheduled order.
- ``lora_meta`` is built once per batch by the LoRA pool (segment info), or None.
- ``attn_meta`` caches per-batch attention metadata the layers share (``paged_attention.AttentionLayout``
  per sliding window), filled by the first layer that needs it; None until then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    """[B+1] int32 cumulative query lengths."""
    seq_lens: torch.Tensor
    """[B] int32 context lengths after this step."""
    block_tables: torch.Tensor
    lora_slots: torch.Tensor
    logits_indices: torch.Tensor
    max_query_len: int
    max_seq_len: int
    lora_meta: Any = None
    attn_meta: dict | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1
