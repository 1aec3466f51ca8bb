"""Waiting for a prefix another request is computing, rather than computing it twice.

The prefix cache only serves blocks whose KV is computed. When two requests
with one long prefix (a document, a system prompt) arrive close together, the
second used to be admitted while the first was still computing that prefix:
it matched only the chunks already done and computed the rest a second time,
side by side with the first. S6's cache-pressure load lost ~13 % of its
ideal cache hits that way on aggregated workers (the second user of a
document arriving 0.3–0.7 s after the first, whose prefill takes ~0.9 s).

:class:`InflightPrefixes` lists, for one step, the prompt blocks that
running requests have yet to compute. A waiting request whose next uncached
block is among them *waits* (stays queued, later requests may pass it) when
that costs it no steps: the steps until the other request has computed the
shared blocks, plus its own steps for the rest, are no more than its own steps
for everything now. A short shared prefix (one block of a system prompt)
never makes a request wait: computing it again costs less than a step.
"""

from __future__ import annotations

import math

from pdserve.engine.block_manager import BlockManager
from pdserve.request import Request


class InflightPrefixes:
    """The prompt blocks running requests are computing, by content hash, for one step."""

    def __init__(self, block_manager: BlockManager, chunk_tokens: int) -> None:
        """``block_manager``: one with prefix caching on; ``chunk_tokens``: the most prompt tokens one
        request computes in one step."""
        self.bm = block_manager
        self.chunk_tokens = max(chunk_tokens, 1)
        self._owner: dict[int, Request] = {}  # hash → the request computing it
        self._computed: dict[str, int] = {}  # request id → tokens it had computed before this step

    def add(self, request: Request, num_computed: int) -> None:
        """``request`` computes the blocks of its tokens from ``num_computed`` on (this step or later)."""
        if num_computed >= request.num_tokens:
            return
        bs = self.bm.block_size
        hashes = self.bm.block_hashes(request)
        self._computed[request.request_id] = num_computed
        for i in range(num_computed // bs, len(hashes)):
            self._owner.setdefault(hashes[i], request)

    def should_wait(self, request: Request) -> bool:
        """True when waiting ``request`` should wait for a running one.

        It waits when its next uncached block is being computed by another
        request and waiting costs it no steps (module docstring). Its cache
        lookup is made only when some request is computing a prompt.
        """
        if not self._owner:
            return False
        num_cached = self.bm.num_cached_prefix(request)
        bs = self.bm.block_size
        hashes = self.bm.block_hashes(request)
        first = num_cached // bs
        if first >= len(hashes) or hashes[first] not in self._owner:
            return False
        owner = self._owner[hashes[first]]
        if owner is request:
            return False
        owner_hashes = self.bm.block_hashes(owner)
        shared = first  # blocks of the prompt the owner computes too (the chain makes them a prefix)
        while shared < min(len(hashes), len(owner_hashes)) and hashes[shared] == owner_hashes[shared]:
            shared += 1
        shared_end = shared * bs
        c = self.chunk_tokens
        own_steps = math.ceil((request.num_tokens - num_cached) / c)
        owner_steps = math.ceil((shared_end - self._computed[owner.request_id]) / c)
        rest_steps = math.ceil((request.num_tokens - shared_end) / c)
        return owner_steps + rest_steps <= own_steps
