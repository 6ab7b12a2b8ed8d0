"""Paged KV block allocation: which fixed-size KV blocks each request owns.

Owns: the free-block pool and one block table (list of block ids) per request.

Invariants:
- A block id is owned by at most one request at a time (never handed out twice);
  ``free`` returns every block of a request to the pool exactly once.
- A request's block table holds ``ceil(tokens / block_size)`` blocks for the
  tokens allocated so far; tables only grow until the request is freed.
- ``num_free_blocks + sum(len(table)) == num_blocks`` at all times.
- Pure Python, no torch: the runner maps block ids to its KV tensors.
"""

from __future__ import annotations

import logging
from collections import deque

from inlaid.request import Request

logger = logging.getLogger(__name__)


class BlockManager:
    """Allocates KV blocks per request from a fixed pool (recompute-style preemption)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._owner: dict[int, str] = {}
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        """The request's block ids (empty when it owns none)."""
        return self._tables.get(request_id, [])

    def num_new_blocks(self, req: Request, num_new_tokens: int) -> int:
        """Extra blocks needed so ``req`` holds ``num_computed_tokens + num_new_tokens`` tokens."""
        needed = self.blocks_for_tokens(req.num_computed_tokens + num_new_tokens)
        return max(needed - len(self.block_table(req.request_id)), 0)

    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        return self.num_new_blocks(req, num_new_tokens) <= len(self._free)

    def allocate_for(self, req: Request, num_new_tokens: int) -> list[int]:
        """Grow ``req``'s table to hold its computed tokens plus ``num_new_tokens``; returns the table.

        Raises ``RuntimeError`` when the pool is short (check ``can_allocate`` first).
        """
        n = self.num_new_blocks(req, num_new_tokens)
        if n > len(self._free):
            raise RuntimeError(f"KV cache out of blocks: need {n}, have {len(self._free)} free")
        table = self._tables.setdefault(req.request_id, [])
        for _ in range(n):
            block = self._free.popleft()
            if block in self._owner:  # invariant guard: never hand a block out twice
                raise AssertionError(f"block {block} already owned by {self._owner[block]}")
            self._owner[block] = req.request_id
            table.append(block)
        return table

    def free(self, req: Request | str) -> int:
        """Return every block of the request to the pool; returns how many were freed."""
        rid = req if isinstance(req, str) else req.request_id
        table = self._tables.pop(rid, [])
        for block in table:
            del self._owner[block]
            self._free.append(block)
        return len(table)
