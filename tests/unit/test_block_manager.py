"""Block manager: allocation, reference counts, prefix caching, eviction, hand-off calls."""

from __future__ import annotations

import pytest

from pdserve.engine.block_manager import BlockManager
from pdserve.request import Request
from pdserve.sampling_params import SamplingParams


def make_request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4))


def assert_all_free(bm: BlockManager) -> None:
    stats = bm.stats()
    assert stats.num_used_blocks == 0
    assert stats.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert not bm.held_request_ids


def test_allocate_and_free_counts_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    req = make_request("a", list(range(10)))
    assert bm.allocate_slots(req, 10)
    assert len(bm.block_ids("a")) == 3
    assert bm.num_free_blocks == 5
    req.num_computed_tokens = 10
    # 11th and 12th tokens fit the third block; the 13th needs a fourth.
    assert bm.append_slot(req)
    assert len(bm.block_ids("a")) == 3
    req.num_computed_tokens = 12
    assert bm.append_slot(req)
    assert len(bm.block_ids("a")) == 4
    bm.free("a")
    assert_all_free(bm)


def test_allocate_fails_without_side_effects() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    req = make_request("a", list(range(12)))
    assert not bm.allocate_slots(req, 12)
    assert bm.block_ids("a") == []
    assert_all_free(bm)


def test_prefix_hit_shares_blocks_and_counts_stats() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    prefix = list(range(100, 112))  # three full blocks
    a = make_request("a", [*prefix, 1, 2])
    assert bm.allocate_slots(a, a.num_tokens)
    a.num_computed_tokens = a.num_tokens
    bm.cache_full_blocks(a)
    assert bm.stats().num_cached_blocks == 3

    b = make_request("b", [*prefix, 7, 8, 9])
    hits, num_cached = bm.get_computed_blocks(b)
    assert num_cached == 12
    assert hits == bm.block_ids("a")[:3]
    assert bm.allocate_slots(b, b.num_tokens - num_cached, hits)
    assert bm.block_ids("b")[:3] == hits
    assert all(bm.blocks[h].ref_count == 2 for h in hits)
    assert bm.stats().prefix_hit_tokens == 12
    bm.free("a")
    bm.free("b")
    assert_all_free(bm)
    # Freed cached blocks stay reusable.
    c = make_request("c", [*prefix, 5])
    assert bm.get_computed_blocks(c)[1] == 12


def test_prefix_lookup_leaves_one_token_to_compute() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(8))
    a = make_request("a", tokens)
    assert bm.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    bm.cache_full_blocks(a)
    bm.free("a")
    _, num_cached = bm.get_computed_blocks(make_request("b", tokens))
    assert num_cached == 4


def test_different_prefix_misses_even_with_same_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5])
    assert bm.allocate_slots(a, 5)
    a.num_computed_tokens = 5
    bm.cache_full_blocks(a)
    # Second block's tokens match but the first block differs: the chain breaks.
    _, num_cached = bm.get_computed_blocks(make_request("b", [9, 9, 3, 4, 5]))
    assert num_cached == 0


def test_eviction_prefers_uncached_then_lru() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_request("a", [1, 2, 3, 4])
    assert bm.allocate_slots(a, 4)
    a.num_computed_tokens = 4
    bm.cache_full_blocks(a)
    bm.free("a")
    assert bm.stats().num_cached_blocks == 2
    # Two uncached blocks are free: taking them keeps the cache intact.
    b = make_request("b", [7, 8, 9, 10])
    assert bm.allocate_slots(b, 4)
    assert bm.stats().num_cached_blocks == 2
    # One more block must evict a cached one: the tail block of a (freed first).
    c = make_request("c", [5, 6])
    assert bm.allocate_slots(c, 2)
    assert bm.stats().num_cached_blocks == 1
    _, n = bm.get_computed_blocks(make_request("d", [1, 2, 3, 4, 0]))
    assert n == 2  # the head block of a's prefix survived
    for rid in ("b", "c"):
        bm.free(rid)
    assert_all_free(bm)


def test_cached_hit_in_free_list_is_reclaimed_not_double_counted() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5])
    assert bm.allocate_slots(a, 5)
    a.num_computed_tokens = 5
    bm.cache_full_blocks(a)
    bm.free("a")
    b = make_request("b", [1, 2, 3, 4, 6, 7])
    hits, n = bm.get_computed_blocks(b)
    assert n == 4
    # Needs 3 blocks in all: 2 hits (free, cached) + 1 new: exactly fits.
    assert bm.allocate_slots(b, b.num_tokens - n, hits)
    assert bm.num_free_blocks == 0
    bm.free("b")
    assert_all_free(bm)


def test_reserve_and_export_release() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    blocks = bm.reserve("remote", 9)
    assert blocks is not None and len(blocks) == 3
    with pytest.raises(ValueError, match="already holds"):
        bm.reserve("remote", 1)
    assert bm.reserve("too-big", 100) is None
    a = make_request("a", list(range(8)))
    assert bm.allocate_slots(a, 8)
    exported = bm.export("a")
    assert exported == bm.block_ids("a")
    assert bm.held_request_ids == {"a"}
    bm.release("a")
    bm.free("remote")
    assert_all_free(bm)
    with pytest.raises(KeyError):
        bm.export("nobody")


def test_double_free_is_harmless_for_unknown_request() -> None:
    bm = BlockManager(num_blocks=2, block_size=2)
    bm.free("never-allocated")
    assert_all_free(bm)
