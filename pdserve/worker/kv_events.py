"""Publishing a worker's prefix-cache changes to the router's cache index.

Lifecycle:

1. At start the worker draws a random ``epoch``: a restarted worker (even
   under the same id) has a new one, so the router knows its old entries are
   void. ``Register`` and every ``Heartbeat`` carry the epoch and the last
   sequence number sent.
2. After every loop iteration, ``collect`` turns the block manager's recorded
   events (stored with parent hash, removed, all cleared) into one
   ``KVEvents`` batch with the next sequence number (1, 2, …), or nothing
   when the cache did not change.
3. When the router sees a gap, a new epoch or an event that contradicts its
   index, it asks for a ``KVSnapshotRequest``; ``snapshot`` answers with every
   cached hash as of the last batch sent.

The cost (events, batches, encoded bytes, CPU seconds spent collecting and
encoding) is counted here, for ``WorkerStats`` and the benchmark.
"""

from __future__ import annotations

import secrets
import time

from pdserve.engine.block_manager import BlockManager
from pdserve.worker import protocol as p


class KVEventPublisher:
    """Batches one worker's prefix-cache events with sequence numbers and an epoch."""

    def __init__(self, block_manager: BlockManager, worker_id: str) -> None:
        self.block_manager = block_manager
        self.worker_id = worker_id
        self.epoch = secrets.randbits(63) or 1
        self.seq = 0
        self.num_events = 0
        self.num_batches = 0
        self.num_snapshots = 0
        self.num_bytes = 0
        self.cpu_s = 0.0

    @property
    def enabled(self) -> bool:
        """False when the worker has no prefix cache (nothing to publish)."""
        return self.block_manager.record_events

    def collect(self) -> bytes | None:
        """The encoded ``KVEvents`` batch of the changes since the last call, or None."""
        started_s = time.thread_time()
        batch = self.take()
        if batch is None:
            return None
        data = p.encode(batch)
        self.num_bytes += len(data)
        self.cpu_s += time.thread_time() - started_s
        return data

    def take(self) -> p.KVEvents | None:
        """The ``KVEvents`` batch of the changes since the last call (not encoded), or None.

        ``collect`` sends it over the wire; the simulator hands it to the router as it is.
        """
        if not self.block_manager.events:
            return None
        events = [p.KVEvent(int(kind), h, parent) for kind, h, parent in self.block_manager.take_events()]
        self.seq += 1
        self.num_events += len(events)
        self.num_batches += 1
        return p.KVEvents(self.worker_id, self.epoch, self.seq, events)

    def snapshot_message(self) -> p.KVSnapshot:
        """The ``KVSnapshot`` of every cached hash, as of the last batch taken (not encoded)."""
        self.num_snapshots += 1
        return p.KVSnapshot(self.worker_id, self.epoch, self.seq, self.block_manager.cached_blocks())

    def snapshot(self) -> bytes:
        """The encoded ``KVSnapshot`` of every cached hash (after pending events are collected)."""
        started_s = time.thread_time()
        data = p.encode(self.snapshot_message())
        self.num_bytes += len(data)
        self.cpu_s += time.thread_time() - started_s
        return data
