"""cache_full_blocks looks only at blocks not yet hashed, with the same results as a full scan."""

from __future__ import annotations

from pdserve.engine.block_manager import BlockManager
from pdserve.request import Request
from pdserve.sampling_params import SamplingParams


def make_request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=64))


def decode(bm: BlockManager, req: Request, num_tokens: int) -> None:
    for _ in range(num_tokens):
        assert bm.append_slot(req)
        req.num_computed_tokens += 1
        bm.cache_full_blocks(req)
        req.append_token(7)


def test_blocks_filled_while_decoding_are_cached_and_found() -> None:
    bm = BlockManager(num_blocks=32, block_size=4)
    a = make_request("a", list(range(6)))
    assert bm.allocate_slots(a, 6)
    a.num_computed_tokens = 6
    bm.cache_full_blocks(a)
    a.append_token(7)
    decode(bm, a, 13)  # 6 prompt + 13 generated tokens computed: 4 full blocks
    cached = [bm.blocks[b].block_hash is not None for b in bm.block_ids("a")]
    assert cached == [True, True, True, True, False]
    twin = make_request("b", list(a.all_token_ids))
    _, num_cached = bm.get_computed_blocks(twin)
    assert num_cached == 16


def test_a_duplicate_block_is_cached_once_its_twin_is_evicted() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    tokens = [1, 2, 3, 4, 5]
    a, b = make_request("a", tokens), make_request("b", tokens)
    for r in (a, b):  # admitted in the same step: neither finds the other's blocks
        assert bm.allocate_slots(r, 5)
        r.num_computed_tokens = 5
    bm.cache_full_blocks(a)
    bm.cache_full_blocks(b)
    b_first = bm.block_ids("b")[0]
    assert bm.blocks[b_first].block_hash is None  # same content as a's first block: not cached twice
    bm.free("a")  # a's cached blocks wait in the LRU; fill the rest of the cache to evict them
    c = make_request("c", [9] * 16)
    assert bm.allocate_slots(c, 16)  # the last free block is a's cached one: evicted
    assert bm.stats().num_cached_blocks == 0
    bm.cache_full_blocks(b)  # a's twin is gone: b's block is retried and cached now
    assert bm.blocks[b_first].block_hash is not None
    _, num_cached = bm.get_computed_blocks(make_request("d", [*tokens, 6, 7, 8]))
    assert num_cached == 4
