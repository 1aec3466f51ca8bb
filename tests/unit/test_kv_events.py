"""Block-manager cache events → the worker's batches → the router's index, kept equal."""

from __future__ import annotations

from pdserve.block_hash import hash_blocks
from pdserve.engine.block_manager import BlockManager, CacheEventKind
from pdserve.request import Request
from pdserve.router.kv_index import KVIndex
from pdserve.sampling_params import SamplingParams
from pdserve.worker import protocol as p
from pdserve.worker.kv_events import KVEventPublisher

BS = 4


def run_prompt(bm: BlockManager, rid: str, tokens: list[int]) -> None:
    """Allocate, 'compute' and free one prompt (its full blocks stay cached)."""
    request = Request(rid, tokens, SamplingParams(max_tokens=1), ())
    hits, num_cached = bm.get_computed_blocks(request)
    assert bm.allocate_slots(request, len(tokens) - num_cached, hits)
    request.num_computed_tokens = len(tokens)
    bm.cache_full_blocks(request)
    bm.free(rid)


def deliver(index: KVIndex, publisher: KVEventPublisher) -> bool:
    data = publisher.collect()
    if data is None:
        return False
    m = p.decode(data)
    assert isinstance(m, p.KVEvents)
    return index.apply_events(
        m.worker_id, m.epoch, m.seq, [(e.kind, e.block_hash, e.parent_hash) for e in m.events]
    )


def test_events_keep_the_index_equal_to_the_cache_through_evictions() -> None:
    bm = BlockManager(num_blocks=6, block_size=BS, record_events=True)
    pub = KVEventPublisher(bm, "w")
    index = KVIndex(block_size=BS)
    index.add_worker("w", BS, pub.epoch)
    snap = p.decode(pub.snapshot())
    assert isinstance(snap, p.KVSnapshot)
    index.apply_snapshot("w", snap.epoch, snap.seq, snap.blocks)
    doc_a, doc_b = list(range(1, 14)), list(range(100, 113))  # 3 cacheable blocks each
    run_prompt(bm, "a", doc_a)
    assert not deliver(index, pub)
    assert index.match(index.hash_prompt(doc_a), ["w"]) == {"w": 3}
    assert pub.seq == 1 and pub.num_events == 3
    run_prompt(bm, "b", doc_b)  # 6 blocks in all: b's fourth block evicts a's tail
    assert not deliver(index, pub)
    assert index.workers["w"].hashes == {h for h, _ in bm.cached_blocks()}
    assert index.match(index.hash_prompt(doc_b), ["w"]) == {"w": 3}
    assert index.match(index.hash_prompt(doc_a), ["w"]) == {"w": 2}
    bm.reset_prefix_cache()
    assert not deliver(index, pub)
    assert index.size == 0 and bm.cached_blocks() == []
    assert pub.num_bytes > 0 and pub.cpu_s >= 0


def test_events_are_ordered_and_chained() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS, record_events=True)
    run_prompt(bm, "a", list(range(1, 10)))  # two full blocks of nine tokens
    hashes = hash_blocks(list(range(1, 10)), BS)
    assert bm.take_events() == [
        (CacheEventKind.STORED, hashes[0], None),
        (CacheEventKind.STORED, hashes[1], hashes[0]),
    ]
    run_prompt(bm, "b", list(range(50, 66)))  # needs all four blocks: both cached ones go
    events = bm.take_events()
    # (a prefix's tail is freed first, so it is evicted first)
    assert [(k, h) for k, h, _ in events if k is CacheEventKind.REMOVED] == [
        (CacheEventKind.REMOVED, hashes[1]),
        (CacheEventKind.REMOVED, hashes[0]),
    ]


def test_no_events_without_prefix_caching() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=False, record_events=True)
    run_prompt(bm, "a", list(range(1, 10)))
    assert bm.events == [] and not KVEventPublisher(bm, "w").enabled
