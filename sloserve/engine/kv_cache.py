"""BlockManager: the paged KV cache's bookkeeping (fixed-size blocks, block tables)."""
from __future__ import annotations

from collections import deque


class BlockManager:
    """Hands out fixed-size KV blocks to requests; the executor owns the memory they index."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self.block_tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, request_id: str, num_tokens: int) -> bool:
        """Grow the request's block table to hold `num_tokens` tokens; False (and no change) if full."""
        table = self.block_tables.setdefault(request_id, [])
        missing = self.blocks_needed(num_tokens) - len(table)
        if missing > len(self._free):
            return False
        for _ in range(missing):
            table.append(self._free.popleft())
        return True

    def free(self, request_id: str) -> None:
        self._free.extend(self.block_tables.pop(request_id, ()))
