"""The router's cache index: events, resyncs, epochs, speculative entries, mismatches."""

from __future__ import annotations

import pytest

from pdserve.block_hash import HASH_SCHEME, hash_blocks
from pdserve.router.kv_index import CLEARED, REMOVED, STORED, IndexMismatchError, KVIndex

BS = 4


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def stored(hashes: list[int]) -> list[tuple[int, int, int | None]]:
    return [(STORED, h, hashes[i - 1] if i else None) for i, h in enumerate(hashes)]


def make_index(clock: Clock | None = None, **kwargs: object) -> KVIndex:
    index = KVIndex(block_size=BS, clock=clock or Clock(), **kwargs)  # type: ignore[arg-type]
    for wid in ("a", "b"):
        index.add_worker(wid, BS, epoch=1)
        index.apply_snapshot(wid, 1, 0, [])  # registration's snapshot: empty
    return index


DOC = list(range(1, 22))  # 21 tokens: 5 cacheable blocks


def test_insert_lookup_evict() -> None:
    index = make_index()
    hashes = index.hash_prompt(DOC)
    assert hashes == hash_blocks(DOC, BS)[:5]
    assert not index.apply_events("a", 1, 1, stored(hashes[:3]))
    assert index.match(hashes, ["a", "b"]) == {"a": 3, "b": 0}
    assert index.size == 3
    # Evicting the middle block cuts the chain there: a prefix match needs every block before.
    assert not index.apply_events("a", 1, 2, [(REMOVED, hashes[1], None)])
    assert index.match(hashes, ["a", "b"]) == {"a": 1, "b": 0}
    assert not index.apply_events("a", 1, 3, [(CLEARED, 0, None)])
    assert index.match(hashes, ["a"]) == {"a": 0} and index.size == 0
    # Another prompt sharing the first two blocks only.
    other = DOC[:8] + [99] * 13
    assert not index.apply_events("b", 1, 1, stored(index.hash_prompt(other)))
    assert index.match(hashes, ["a", "b"]) == {"a": 0, "b": 2}


def test_gap_starts_resync_and_snapshot_replaces_entries() -> None:
    index = make_index()
    hashes = index.hash_prompt(DOC)
    assert not index.apply_events("a", 1, 1, stored(hashes[:2]))
    assert index.apply_events("a", 1, 3, stored(hashes[2:4]))  # batch 2 was lost
    assert index.workers["a"].num_resyncs == 1
    # Until the snapshot, batches are ignored (the snapshot covers them) and old entries stay usable.
    assert not index.apply_events("a", 1, 4, [(REMOVED, hashes[0], None)])
    assert index.match(hashes, ["a"]) == {"a": 2}
    index.apply_snapshot("a", 1, 4, [(h, None) for h in hashes[1:5]])
    assert index.match(hashes, ["a"]) == {"a": 0}  # block 0 was evicted
    assert index.workers["a"].hashes == set(hashes[1:5])
    assert not index.apply_events("a", 1, 5, stored([hashes[0]]))
    assert index.match(hashes, ["a"]) == {"a": 5}


@pytest.mark.parametrize(
    "bad",
    [
        [(REMOVED, 12345, None)],  # removing what it never stored
        [(STORED, 777, None), (STORED, 777, None)],  # storing twice
        [(9, 1, None)],  # unknown kind
    ],
)
def test_contradicting_events_resync_instead_of_corrupting(bad: list[tuple[int, int, int | None]]) -> None:
    index = make_index()
    hashes = index.hash_prompt(DOC)
    assert not index.apply_events("a", 1, 1, stored(hashes[:2]))
    assert index.apply_events("a", 1, 2, bad)
    index.apply_snapshot("a", 1, 2, [(h, None) for h in hashes[:2]])
    assert index.match(hashes, ["a"]) == {"a": 2} and index.size == 2


def test_out_of_order_and_duplicate_batches_resync() -> None:
    index = make_index()
    hashes = index.hash_prompt(DOC)
    assert not index.apply_events("a", 1, 1, stored(hashes[:1]))
    assert index.apply_events("a", 1, 1, stored(hashes[1:2]))  # a repeated sequence number
    assert index.workers["a"].resync_since_s is not None


def test_new_epoch_drops_a_restarted_workers_blocks() -> None:
    index = make_index()
    hashes = index.hash_prompt(DOC)
    assert not index.apply_events("a", 1, 1, stored(hashes))
    assert index.match(hashes, ["a"]) == {"a": 5}
    assert index.apply_events("a", 2, 1, stored(hashes[:1]))  # same id, new process
    assert index.match(hashes, ["a"]) == {"a": 0}
    index.apply_snapshot("a", 1, 9, [(h, None) for h in hashes])  # a stale answer of the old epoch
    assert index.match(hashes, ["a"]) == {"a": 0}
    index.apply_snapshot("a", 2, 1, [(hashes[0], None)])
    assert index.match(hashes, ["a"]) == {"a": 1}


def test_heartbeat_reveals_a_lost_batch() -> None:
    index = make_index()
    hashes = index.hash_prompt(DOC)
    assert not index.apply_events("a", 1, 1, stored(hashes[:2]))
    assert not index.check_heartbeat("a", 1, 1)
    assert index.check_heartbeat("a", 1, 2)  # the worker sent batch 2; it never arrived
    assert index.workers["a"].resync_since_s is not None


def test_missing_snapshot_degrades_to_speculative_only() -> None:
    clock = Clock()
    index = make_index(clock, resync_timeout_s=5.0)
    hashes = index.hash_prompt(DOC)
    assert not index.apply_events("a", 1, 1, stored(hashes))
    assert index.apply_events("a", 1, 5, [])
    clock.now += 1
    assert index.due_resyncs() == []
    assert index.match(hashes, ["a"]) == {"a": 5}  # approximate meanwhile
    clock.now += 5
    assert index.due_resyncs() == ["a"]  # asked again, and its entries no longer trusted
    assert index.match(hashes, ["a"]) == {"a": 0}
    assert index.workers["a"].degraded


def test_speculative_entries_expire() -> None:
    clock = Clock()
    index = make_index(clock, speculative_ttl_s=2.0)
    hashes = index.hash_prompt(DOC)
    index.add_speculative("b", hashes[:3])
    assert index.match(hashes, ["a", "b"]) == {"a": 0, "b": 3}
    assert index.num_speculative == 3
    clock.now += 2.5
    assert index.match(hashes, ["a", "b"]) == {"a": 0, "b": 0}
    assert index.num_speculative == 0


def test_removed_worker_drops_entries() -> None:
    index = make_index()
    hashes = index.hash_prompt(DOC)
    assert not index.apply_events("a", 1, 1, stored(hashes))
    assert not index.apply_events("b", 1, 1, stored(hashes[:2]))
    index.remove_worker("a")
    assert index.match(hashes, ["a", "b"]) == {"a": 0, "b": 2}
    assert index.size == 2
    assert not index.apply_events("a", 1, 2, stored(hashes))  # late batch of the removed worker: ignored
    assert index.size == 2


def test_block_size_and_hashing_must_agree() -> None:
    index = KVIndex(block_size=None)
    index.check_worker(16, HASH_SCHEME)
    index.add_worker("a", 16, epoch=1)
    assert index.block_size == 16  # the first worker sets it
    with pytest.raises(IndexMismatchError, match="block size 32"):
        index.check_worker(32, HASH_SCHEME)
    with pytest.raises(IndexMismatchError, match="hashing"):
        index.check_worker(16, "python-hash")
    fixed = KVIndex(block_size=8)
    with pytest.raises(IndexMismatchError, match="block size 16 differs from the router's 8"):
        fixed.check_worker(16, HASH_SCHEME)


def test_held_blocks_counts_confirmed_and_live_speculative_entries() -> None:
    clock = Clock()
    index = make_index(clock, speculative_ttl_s=2.0)
    hashes = index.hash_prompt(DOC)
    assert not index.apply_events("a", 1, 1, stored(hashes[:2]))
    index.add_speculative("b", hashes[:3])
    index.add_speculative("b", hashes[:3])  # sent again: still 3 entries, a later expiry
    assert (index.held_blocks("a"), index.held_blocks("b")) == (2, 3)
    clock.now += 2.5
    assert (index.held_blocks("a"), index.held_blocks("b")) == (2, 0)
    assert index.held_blocks("gone") == 0
