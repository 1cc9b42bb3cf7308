"""BlockManager: the paged KV cache's bookkeeping: block tables, reference counts and the prefix cache."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# A full block's identity: (its parent block's chain hash, its own token ids). The KV of a block
# depends on every token before it, so the parent's hash chains the whole prefix in (vLLM v1's scheme).
BlockKey = tuple[int, tuple[int, ...]]
_ROOT = 0  # the "parent hash" of a request's first block


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    key: BlockKey | None = None  # set while this block is the prefix cache's entry for its content


@dataclass(slots=True)
class PrefixCacheStats:
    """Prompt tokens looked up in the prefix cache and tokens found there (vLLM's queries and hits)."""

    queries: int = 0
    hits: int = 0


class BlockManager:
    """Hands out fixed-size KV blocks to requests; the executor owns the memory they index.

    With prefix caching, a block whose tokens are all computed is entered in a content-addressed
    cache. A request whose prompt starts with cached blocks shares them (reference counted) instead
    of recomputing. A block nobody references any more keeps its content and stays findable until a
    new block is needed and it is the least recently freed one (LRU eviction).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Unreferenced blocks in eviction order, first to go first: blocks holding nothing reusable
        # sit at the front, cached ones join at the back when freed, so the oldest content goes first.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[BlockKey, int] = {}
        self.block_tables: dict[str, list[int]] = {}
        # Per request: chain hashes of its leading full, computed blocks (their keys' hashes).
        self._chains: dict[str, list[int]] = {}
        self.stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds: empty ones and cached ones that may be evicted."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_prefix(self, token_ids: list[int]) -> list[int]:
        """The cached blocks that hold the longest prefix of `token_ids` made of full blocks.

        It never covers the last token: that one must be computed to yield the next token's logits.
        The dict lookup compares whole keys, so a hash hit is checked against the stored tokens.
        """
        return _cached_prefix(self._cached, self.block_size, token_ids) if self.enable_prefix_caching else []

    def num_cached_tokens(self, token_ids: list[int]) -> int:
        """How many leading tokens of `token_ids` the prefix cache holds now; allocates and touches nothing."""
        return len(self.cached_prefix(token_ids)) * self.block_size

    def frozen_prefix_cache(self) -> PrefixCacheIndex:
        """A copy of the cache's index that another thread may read while the engine steps (admission)."""
        return PrefixCacheIndex(dict(self._cached) if self.enable_prefix_caching else {}, self.block_size)

    def record_lookup(self, num_tokens: int, num_cached_tokens: int) -> None:
        """Count an admitted request's lookup for the prefix-cache hit rate."""
        if self.enable_prefix_caching:
            self.stats.queries += num_tokens
            self.stats.hits += num_cached_tokens

    def allocate_slots(self, request_id: str, num_tokens: int, cached: Sequence[int] = ()) -> bool:
        """Grow the request's block table to hold `num_tokens` tokens; False (and no change) if full.

        `cached` (from `cached_prefix`, for a request that holds no blocks yet) starts the table with
        shared blocks; they are taken out of the free queue, so making room never evicts them.
        """
        table = self.block_tables.get(request_id, [])
        if cached and table:
            raise ValueError(f"request {request_id!r} already holds blocks; cached blocks start a new table")
        missing = self.blocks_needed(num_tokens) - len(table) - len(cached)
        in_free_queue = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        if missing > len(self._free) - in_free_queue:
            return False
        chain = self._chains.setdefault(request_id, [])
        for block_id in cached:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            table.append(block_id)
            chain.append(hash(block.key))
        for _ in range(missing):
            table.append(self._take_free())
        self.block_tables[request_id] = table
        return True

    def _take_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.key is not None:  # evict: its content is about to be overwritten
            del self._cached[block.key]
            block.key = None
        block.ref_count = 1
        return block_id

    def cache_full_blocks(self, request_id: str, num_computed_tokens: int,
                          token_slice: Callable[[int, int], list[int]]) -> None:
        """Enter the request's blocks that its computed tokens now fill into the prefix cache.

        Called after a step has written their KV, never when it is only planned: a block is only
        findable once its content is real. `token_slice(start, end)` gives the request's tokens.
        """
        table = self.block_tables.get(request_id)
        if not self.enable_prefix_caching or table is None:
            return
        chain, bs = self._chains.setdefault(request_id, []), self.block_size
        for i in range(len(chain), min(num_computed_tokens // bs, len(table))):
            key = (chain[-1] if chain else _ROOT, tuple(token_slice(i * bs, (i + 1) * bs)))
            chain.append(hash(key))
            block = self.blocks[table[i]]
            # Two requests may compute the same content side by side: the first block stays the
            # cache's entry; the duplicate is used by its request and freed as plain memory.
            if block.key is None and key not in self._cached:
                block.key = key
                self._cached[key] = block.block_id

    def free(self, request_id: str) -> None:
        """Drop the request's references; a block nobody else holds becomes free (and stays cached)."""
        self._chains.pop(request_id, None)
        # Tail first, so among blocks freed together the end of a prefix is evicted before its start.
        for block_id in reversed(self.block_tables.pop(request_id, ())):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            self._free[block_id] = None
            if block.key is None:
                self._free.move_to_end(block_id, last=False)


class PrefixCacheIndex:
    """The prefix cache's content index as it was at one moment (BlockManager.frozen_prefix_cache)."""

    __slots__ = ("_cached", "block_size")

    def __init__(self, cached: dict[BlockKey, int], block_size: int) -> None:
        self._cached = cached
        self.block_size = block_size

    def num_cached_tokens(self, token_ids: list[int]) -> int:
        return len(_cached_prefix(self._cached, self.block_size, token_ids)) * self.block_size


def _cached_prefix(cached: dict[BlockKey, int], bs: int, token_ids: list[int]) -> list[int]:
    parent, hits = _ROOT, []
    for i in range((len(token_ids) - 1) // bs):
        key = (parent, tuple(token_ids[i * bs:(i + 1) * bs]))
        block_id = cached.get(key)
        if block_id is None:
            break
        hits.append(block_id)
        parent = hash(key)
    return hits
