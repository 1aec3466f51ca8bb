"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts, prefix caching.

No torch here: the block manager only hands out block ids; the model runner
owns the tensors they index.

Lifecycle of a block:

1. free and uncached: on the ``_free_uncached`` stack, handed out first.
2. in use: ``ref_count`` ≥ 1, listed in one or more requests' block tables.
3. when full and computed, a block gets a content hash chained over its whole
   prefix (``cache_full_blocks``); other requests with the same prefix share it.
4. freed (``ref_count`` back to 0): a hashed block goes to the LRU of free
   cached blocks (still reusable by a prefix hit), an unhashed one back to the
   stack. Allocation evicts the least recently freed cached block only when no
   uncached block is left.

Ownership: a request's blocks belong to it from ``allocate_slots`` (or
``reserve``) until ``free`` (``release`` on the prefill side of a hand-off).

With ``record_events`` on, every change to the set of cached hashes is
appended to ``events`` in order (a block stored with its parent's hash, a
block removed, the whole cache cleared) for the worker to publish to the
router's cache index (``take_events``; ``cached_blocks`` is the snapshot).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.block_hash import hash_block
from pdserve.request import Request


class CacheEventKind(enum.IntEnum):
    """What happened to the set of cached block hashes."""

    STORED = 0  # a full block's hash entered the cache (with its parent's hash)
    REMOVED = 1  # a hash left the cache (evicted)
    CLEARED = 2  # every hash left the cache


CacheEvent = tuple[CacheEventKind, int, int | None]
"""``(kind, block_hash, parent_hash)``; a CLEARED event carries hash 0."""


@dataclass
class Block:
    """One KV block: its id, users, and (once full) its prefix hash."""

    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    parent_hash: int | None = None
    token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class BlockManagerStats:
    """A snapshot of block usage and prefix-cache effectiveness."""

    num_blocks: int
    num_free_blocks: int
    num_used_blocks: int
    num_cached_blocks: int
    num_held_requests: int
    prefix_query_tokens: int
    prefix_hit_tokens: int

    @property
    def prefix_hit_rate(self) -> float:
        """Fraction of looked-up prompt tokens found in the prefix cache."""
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0


class BlockManager:
    """Allocates KV blocks to requests, with prefix caching and LRU eviction."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        record_events: bool = False,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be ≥ 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Reversed so that block 0 is handed out first (easier to read in tests).
        self._free_uncached: list[int] = list(range(num_blocks - 1, -1, -1))
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block: dict[int, int] = {}
        self._req_blocks: dict[str, list[int]] = {}
        self._req_hashes: dict[str, list[int]] = {}
        # Per request, how many leading blocks are known hashed (they stay so while it holds them):
        # a decode step then looks at its new blocks only, not its whole table.
        self._req_num_hashed: dict[str, int] = {}
        self._held: set[str] = set()
        self._prefix_query_tokens = 0
        self._prefix_hit_tokens = 0
        self.record_events = record_events and enable_prefix_caching
        self.events: list[CacheEvent] = []

    # -- queries ---------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request uses (cached ones included: they can be evicted)."""
        return len(self._free_uncached) + len(self._free_cached)

    def block_ids(self, request_id: str) -> list[int]:
        """The block table of a request (empty if it holds none)."""
        return self._req_blocks.get(request_id, [])

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def stats(self) -> BlockManagerStats:
        """Current usage counters."""
        num_free = self.num_free_blocks
        return BlockManagerStats(
            num_blocks=self.num_blocks,
            num_free_blocks=num_free,
            num_used_blocks=self.num_blocks - num_free,
            num_cached_blocks=len(self._hash_to_block),
            num_held_requests=len(self._held),
            prefix_query_tokens=self._prefix_query_tokens,
            prefix_hit_tokens=self._prefix_hit_tokens,
        )

    # -- prefix cache ----------------------------------------------------------

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Look up the longest cached prefix of a request's tokens.

        Returns the hit block ids (not yet referenced: pass them to
        ``allocate_slots``) and the number of tokens they cover. At least one
        token is always left to compute, so the request gets logits.
        """
        if not self.enable_prefix_caching:
            return [], 0
        hits = self._match(request)
        self._prefix_query_tokens += request.num_tokens
        self._prefix_hit_tokens += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def num_cached_prefix(self, request: Request) -> int:
        """Tokens of the request's longest cached prefix (``get_computed_blocks``, not counted in stats)."""
        return len(self._match(request)) * self.block_size if self.enable_prefix_caching else 0

    def _match(self, request: Request) -> list[int]:
        tokens = request.all_token_ids
        num_full = (len(tokens) - 1) // self.block_size
        hashes = self._hashes(request, num_full)
        hits: list[int] = []
        for i in range(num_full):
            block_id = self._hash_to_block.get(hashes[i])
            if block_id is None:
                break
            start = i * self.block_size
            if self.blocks[block_id].token_ids != tuple(tokens[start : start + self.block_size]):
                break  # hash collision: treat as a miss
            hits.append(block_id)
        return hits

    def cache_full_blocks(self, request: Request) -> None:
        """Register the hashes of a request's blocks that are full and computed.

        Call after the step that computed them: only then is their KV valid
        for another request to reuse.
        """
        if not self.enable_prefix_caching:
            return
        table = self._req_blocks.get(request.request_id)
        if not table:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(table))
        num_hashed = self._req_num_hashed.get(request.request_id, 0)
        if num_full <= num_hashed:
            return
        hashes = self._hashes(request, num_full)
        for i in range(num_hashed, num_full):
            block = self.blocks[table[i]]
            if block.block_hash is not None:
                num_hashed += i == num_hashed
                continue
            if hashes[i] in self._hash_to_block:
                continue  # the same content is already cached in another block (retried next time)
            start = i * self.block_size
            parent = hashes[i - 1] if i else None
            block.block_hash = hashes[i]
            block.parent_hash = parent
            block.token_ids = tuple(request.all_token_ids[start : start + self.block_size])
            self._hash_to_block[hashes[i]] = block.block_id
            if self.record_events:
                self.events.append((CacheEventKind.STORED, hashes[i], parent))
            num_hashed += i == num_hashed
        self._req_num_hashed[request.request_id] = num_hashed

    def cached_blocks(self) -> list[tuple[int, int | None]]:
        """Every cached hash with its parent's hash (the snapshot behind ``events``)."""
        return [(h, self.blocks[b].parent_hash) for h, b in self._hash_to_block.items()]

    def take_events(self) -> list[CacheEvent]:
        """The cache events recorded since the last call (oldest first)."""
        events, self.events = self.events, []
        return events

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (blocks in use keep their KV, but no longer match)."""
        for block_id in list(self._free_cached):
            self._free_uncached.append(block_id)
        self._free_cached.clear()
        for block_id in self._hash_to_block.values():
            block = self.blocks[block_id]
            block.block_hash = block.parent_hash = block.token_ids = None
        self._hash_to_block.clear()
        self._req_num_hashed.clear()  # held blocks lost their hashes too
        if self.record_events:
            self.events.append((CacheEventKind.CLEARED, 0, None))

    def block_hashes(self, request: Request) -> list[int]:
        """The chained hashes of every full block of a request's tokens (memoized per request)."""
        return self._hashes(request, request.num_tokens // self.block_size)

    def _hashes(self, request: Request, num_full: int) -> list[int]:
        hashes = self._req_hashes.setdefault(request.request_id, [])
        tokens = request.all_token_ids
        while len(hashes) < num_full:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, tokens[i * self.block_size : (i + 1) * self.block_size]))
        return hashes

    # -- allocation --------------------------------------------------------------

    def can_allocate(self, num_blocks: int) -> bool:
        """True when ``num_blocks`` new blocks can be handed out now."""
        return num_blocks <= self.num_free_blocks

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()
    ) -> bool:
        """Make the request's block table cover its computed plus new tokens.

        ``computed_blocks`` (from ``get_computed_blocks``, on first admission)
        are shared, not copied. Returns False, changing nothing, when there
        are not enough free blocks.
        """
        table = self._req_blocks.get(request.request_id, [])
        num_computed = max(request.num_computed_tokens, len(computed_blocks) * self.block_size)
        num_needed = self.num_blocks_for(num_computed + num_new_tokens)
        num_new_blocks = num_needed - len(table) - len(computed_blocks)
        # Cached hits sitting in the free LRU are about to leave it.
        num_reclaimed = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)
        if num_new_blocks > self.num_free_blocks - num_reclaimed:
            return False
        table = self._req_blocks.setdefault(request.request_id, table)
        for block_id in computed_blocks:
            self._touch(block_id)
            table.append(block_id)
        for _ in range(max(num_new_blocks, 0)):
            table.append(self._take_free_block())
        return True

    def append_slot(self, request: Request) -> bool:
        """Room for one more token of a decoding request (False if out of blocks)."""
        return self.allocate_slots(request, 1)

    def free(self, request_id: str) -> None:
        """Drop a request's references to its blocks; unused blocks become free.

        Blocks are released tail first, so the LRU evicts a prefix's tail
        before its head (a shorter shared prefix stays useful longer).
        """
        table = self._req_blocks.pop(request_id, [])
        self._req_hashes.pop(request_id, None)
        self._req_num_hashed.pop(request_id, None)
        self._held.discard(request_id)
        for block_id in reversed(table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed twice"
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is not None:
                    self._free_cached[block_id] = None
                else:
                    self._free_uncached.append(block_id)

    # -- disaggregation ------------------------------------------------------------

    def reserve(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Decode side: reserve blocks for KV that another worker will write.

        Returns the block ids, or None (nothing reserved) when there is no room.
        """
        if request_id in self._req_blocks:
            raise ValueError(f"request {request_id!r} already holds blocks")
        num_blocks = self.num_blocks_for(num_tokens)
        if not self.can_allocate(num_blocks):
            return None
        table = [self._take_free_block() for _ in range(num_blocks)]
        self._req_blocks[request_id] = table
        return list(table)

    def reserve_with_prefix(self, request: Request, num_tokens: int) -> tuple[list[int], int] | None:
        """Decode side: like ``reserve``, but blocks this cache already holds are shared.

        Returns the block table and the number of leading tokens whose KV is
        already in it (a multiple of the block size: only the rest needs to be
        written), or None (nothing reserved) when there is no room.
        """
        rid = request.request_id
        if rid in self._req_blocks:
            raise ValueError(f"request {rid!r} already holds blocks")
        hits, num_cached = self.get_computed_blocks(request)
        num_new = self.num_blocks_for(num_tokens) - len(hits)
        num_reclaimed = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if num_new > self.num_free_blocks - num_reclaimed:
            self._req_hashes.pop(rid, None)
            return None
        for block_id in hits:
            self._touch(block_id)
        table = hits + [self._take_free_block() for _ in range(max(num_new, 0))]
        self._req_blocks[rid] = table
        return list(table), num_cached

    def export(self, request_id: str) -> list[int]:
        """Prefill side: the blocks holding a request's KV, kept alive until ``release``."""
        if request_id not in self._req_blocks:
            raise KeyError(f"request {request_id!r} holds no blocks")
        self._held.add(request_id)
        return list(self._req_blocks[request_id])

    def release(self, request_id: str) -> None:
        """Prefill side: the receiver has the KV (or gave up); free the held blocks."""
        self.free(request_id)

    @property
    def held_request_ids(self) -> set[str]:
        """Requests whose blocks are exported and not yet released."""
        return set(self._held)

    # -- internals -------------------------------------------------------------------

    def _touch(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free_cached[block_id]
        block.ref_count += 1

    def _take_free_block(self) -> int:
        if self._free_uncached:
            block_id = self._free_uncached.pop()
        else:
            block_id, _ = self._free_cached.popitem(last=False)
            block = self.blocks[block_id]
            assert block.block_hash is not None
            del self._hash_to_block[block.block_hash]
            if self.record_events:
                self.events.append((CacheEventKind.REMOVED, block.block_hash, None))
            block.block_hash = block.parent_hash = block.token_ids = None
        self.blocks[block_id].ref_count = 1
        return block_id
