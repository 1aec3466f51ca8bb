"""Chained content hashes of full KV blocks, shared by workers and the router.

A block's hash covers its tokens and, through its parent's hash, every token
before it: two prompts share the hash of block ``i`` exactly when their first
``(i + 1) * block_size`` tokens agree. The block manager keys its prefix cache
by these hashes, workers publish them in KV events, and the router hashes
prompts the same way to look them up in its cache index, so the function must
give the same value in every process and on every host: no ``hash()`` (salted
per process for some types), no torch.

``HASH_SCHEME`` names the function; workers send it when they register and the
router refuses a worker whose scheme (or block size) differs from its own.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence

HASH_SCHEME = "blake2b64-chained-v1"

_NO_PARENT = b"\xff" * 8


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Content hash (unsigned 64-bit) of one full block, chained over every block before it."""
    tokens = array("I", token_ids)
    if sys.byteorder == "big":
        tokens.byteswap()
    h = hashlib.blake2b(digest_size=8)
    h.update(_NO_PARENT if parent_hash is None else parent_hash.to_bytes(8, "little"))
    h.update(tokens.tobytes())
    return int.from_bytes(h.digest(), "little")


def hash_blocks(token_ids: Sequence[int], block_size: int, max_blocks: int | None = None) -> list[int]:
    """The chained hashes of the full blocks of ``token_ids`` (at most ``max_blocks``)."""
    num_full = len(token_ids) // block_size
    if max_blocks is not None:
        num_full = min(num_full, max_blocks)
    hashes: list[int] = []
    parent: int | None = None
    for i in range(num_full):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes


def num_cacheable_blocks(num_tokens: int, block_size: int) -> int:
    """Full blocks of a prompt a prefix cache can serve (one token is always computed)."""
    return max(num_tokens - 1, 0) // block_size
