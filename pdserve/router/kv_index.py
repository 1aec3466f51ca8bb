"""The router's cache index: which workers hold which chained block hashes.

Lifecycle of one worker's entries:

1. Registration: the worker's block size and hashing must equal the index's
   (``check_worker``; the first worker fixes the block size when the router
   was not told one); its entries start empty and a snapshot is requested.
2. ``KVEvents`` batches (stored / removed / all cleared) are applied in order.
   A batch whose sequence number is not the next one, a new epoch (the worker
   restarted under the same id), or an event that contradicts the index
   (removing a hash it does not hold, storing one it already holds, an
   unknown kind) starts a *resync*: batches are ignored until a
   ``KVSnapshot`` replaces the worker's entries. Nothing half-applied is
   trusted for long: a resync that gets no snapshot within
   ``resync_timeout_s`` drops the worker's entries (approximate routing from
   speculative entries only, never routing on a stale index) and asks again.
3. Heartbeats carry the last sequence number sent: a lost batch (or eviction
   the router never heard of) is noticed within one heartbeat.
4. Removal of the worker drops all its entries.

Speculative entries: when the router sends a prompt to a worker it records
the prompt's hashes for that worker for ``speculative_ttl_s`` seconds, so a
burst of requests with one prefix follows the first one before the worker's
events confirm it.

The index is plain data with an injectable clock: no sockets, no asyncio.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from pdserve.block_hash import HASH_SCHEME, hash_blocks

logger = logging.getLogger(__name__)

STORED, REMOVED, CLEARED = 0, 1, 2
RATE_WINDOW_S = 10.0


class IndexMismatchError(ValueError):
    """A worker's block size or hashing differs from the router's: routing on it would be wrong."""


@dataclass
class WorkerCacheState:
    """What the index knows of one worker's prefix cache."""

    epoch: int
    seq: int = 0
    hashes: set[int] = field(default_factory=set)
    resync_since_s: float | None = None  # a snapshot was requested then and has not come
    degraded: bool = False  # entries dropped after a resync timed out (speculative only)
    num_events: int = 0
    num_resyncs: int = 0
    recent: deque[tuple[float, int]] = field(default_factory=deque)  # (time, events) for the rate


class KVIndex:
    """Workers' cached block hashes, from their events, plus speculative entries."""

    def __init__(
        self,
        block_size: int | None = None,
        hash_scheme: str = HASH_SCHEME,
        speculative_ttl_s: float = 5.0,
        resync_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.block_size = block_size
        self.fixed_block_size = block_size is not None
        self.hash_scheme = hash_scheme
        self.speculative_ttl_s = speculative_ttl_s
        self.resync_timeout_s = resync_timeout_s
        self.clock = clock
        self.workers: dict[str, WorkerCacheState] = {}
        self._holders: dict[int, set[str]] = {}
        self._speculative: dict[int, dict[str, float]] = {}
        self._expiries: deque[tuple[float, int, str]] = deque()
        self._num_speculative: Counter[str] = Counter()  # live speculative entries per worker
        self.num_resyncs = 0
        self.num_rejected_events = 0

    # -- workers ------------------------------------------------------------------------

    def check_worker(self, block_size: int, hash_scheme: str, prefix_caching: bool = True) -> None:
        """Raise :class:`IndexMismatchError` when a worker's cache cannot be indexed here."""
        if hash_scheme != self.hash_scheme:
            raise IndexMismatchError(
                f"block hashing {hash_scheme or '(none)'!r} differs from the router's {self.hash_scheme!r}: "
                "run the same pdserve version on router and workers"
            )
        if self.block_size is None or (not self.fixed_block_size and not self.workers):
            return
        if block_size != self.block_size:
            raise IndexMismatchError(
                f"block size {block_size} differs from the router's {self.block_size} "
                "(every worker must use one --block-size, and the router's --kv-block-size must match it)"
            )

    def add_worker(self, worker_id: str, block_size: int, epoch: int) -> None:
        """A worker (re-)registered: its entries start empty until its snapshot arrives."""
        if self.block_size is None or (not self.fixed_block_size and not self.workers):
            self.block_size = block_size
        self.remove_worker(worker_id)
        self.workers[worker_id] = WorkerCacheState(epoch=epoch, resync_since_s=self.clock())

    def remove_worker(self, worker_id: str) -> None:
        """Drop every entry of a worker (gone, or restarting)."""
        state = self.workers.pop(worker_id, None)
        if state is not None:
            self._drop_hashes(worker_id, state)

    # -- events ---------------------------------------------------------------------------

    def apply_events(
        self, worker_id: str, epoch: int, seq: int, events: Iterable[tuple[int, int, int | None]]
    ) -> bool:
        """Apply one batch; True when the worker must be asked for a snapshot (resync)."""
        state = self.workers.get(worker_id)
        if state is None:
            return False  # not registered (yet): its registration asks for a snapshot
        if state.resync_since_s is not None:
            return False  # waiting for the snapshot: it covers this batch
        if epoch != state.epoch:
            return self._start_resync(worker_id, state, f"new epoch {epoch}", epoch)
        if seq != state.seq + 1:
            return self._start_resync(worker_id, state, f"batch {seq} after {state.seq}")
        state.seq = seq
        num = 0
        for kind, block_hash, _parent in events:
            num += 1
            if kind == STORED:
                if block_hash in state.hashes:
                    return self._start_resync(worker_id, state, f"stored {block_hash:x} twice")
                state.hashes.add(block_hash)
                self._holders.setdefault(block_hash, set()).add(worker_id)
            elif kind == REMOVED:
                if block_hash not in state.hashes:
                    return self._start_resync(worker_id, state, f"removed unknown {block_hash:x}")
                state.hashes.discard(block_hash)
                self._unhold(block_hash, worker_id)
            elif kind == CLEARED:
                self._drop_hashes(worker_id, state)
            else:
                return self._start_resync(worker_id, state, f"unknown event kind {kind!r}")
        self._count(state, num)
        return False

    def apply_snapshot(
        self, worker_id: str, epoch: int, seq: int, blocks: Sequence[tuple[int, int | None]]
    ) -> None:
        """Replace a worker's entries with its snapshot (as of batch ``seq``)."""
        state = self.workers.get(worker_id)
        if state is None or epoch != state.epoch:
            return  # from an older incarnation: a newer resync is under way
        self._drop_hashes(worker_id, state)
        for block_hash, _parent in blocks:
            state.hashes.add(block_hash)
            self._holders.setdefault(block_hash, set()).add(worker_id)
        state.seq = seq
        state.resync_since_s = None
        state.degraded = False

    def check_heartbeat(self, worker_id: str, epoch: int, seq: int) -> bool:
        """A heartbeat's (epoch, last batch sent); True when a resync must start."""
        state = self.workers.get(worker_id)
        if state is None or state.resync_since_s is not None:
            return False
        if epoch != state.epoch:
            return self._start_resync(worker_id, state, f"heartbeat of epoch {epoch}", epoch)
        if seq != state.seq:
            return self._start_resync(worker_id, state, f"heartbeat at batch {seq}, index at {state.seq}")
        return False

    def due_resyncs(self) -> list[str]:
        """Workers whose snapshot is overdue: their entries are dropped and a new request is due."""
        now = self.clock()
        due = []
        for worker_id, state in self.workers.items():
            if state.resync_since_s is not None and now - state.resync_since_s > self.resync_timeout_s:
                if not state.degraded:
                    logger.warning("kv index: no snapshot from %s; routing approximately", worker_id)
                state.degraded = True
                self._drop_hashes(worker_id, state)
                state.resync_since_s = now
                due.append(worker_id)
        return due

    # -- lookups ----------------------------------------------------------------------------

    def hash_prompt(self, token_ids: Sequence[int]) -> list[int]:
        """The chained hashes of a prompt's cacheable full blocks (empty before any worker registered)."""
        if self.block_size is None:
            return []
        return hash_blocks(token_ids, self.block_size, max(len(token_ids) - 1, 0) // self.block_size)

    def match(self, hashes: Sequence[int], worker_ids: Iterable[str]) -> dict[str, int]:
        """Leading blocks of ``hashes`` each worker holds (confirmed or speculative)."""
        now = self.clock()
        counts = dict.fromkeys(worker_ids, 0)
        alive = set(counts)
        for i, block_hash in enumerate(hashes):
            holders = self._holders.get(block_hash, ())
            spec = self._speculative.get(block_hash)
            alive = {w for w in alive if w in holders or (spec is not None and spec.get(w, 0.0) > now)}
            if not alive:
                break
            for w in alive:
                counts[w] = i + 1
        return counts

    def add_speculative(self, worker_id: str, hashes: Sequence[int]) -> None:
        """The router just sent these blocks' prompt to ``worker_id``: assume it holds them for a while."""
        now = self.clock()
        self._expire(now)
        expiry = now + self.speculative_ttl_s
        for block_hash in hashes:
            spec = self._speculative.setdefault(block_hash, {})
            if worker_id not in spec:
                self._num_speculative[worker_id] += 1
            spec[worker_id] = expiry
            self._expiries.append((expiry, block_hash, worker_id))

    # -- figures --------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Confirmed (worker, block) entries."""
        return sum(len(s.hashes) for s in self.workers.values())

    def held_blocks(self, worker_id: str) -> int:
        """Blocks a worker holds as far as the index knows: confirmed plus live speculative entries.

        A block both confirmed and still speculative counts twice until its
        speculative entry expires (``speculative_ttl_s``): the figure only
        orders near-tied candidates (the emptiest cache takes a new prefix).
        """
        self._expire(self.clock())
        state = self.workers.get(worker_id)
        return (len(state.hashes) if state else 0) + self._num_speculative.get(worker_id, 0)

    @property
    def num_speculative(self) -> int:
        """Speculative (worker, block) entries not yet purged."""
        self._expire(self.clock())
        return sum(len(v) for v in self._speculative.values())

    def events_per_s(self, worker_id: str) -> float:
        """Events applied per second over the last ``RATE_WINDOW_S`` seconds."""
        state = self.workers.get(worker_id)
        if state is None:
            return 0.0
        self._trim(state, self.clock())
        return sum(n for _, n in state.recent) / RATE_WINDOW_S

    # -- internals --------------------------------------------------------------------------------

    def _start_resync(
        self, worker_id: str, state: WorkerCacheState, why: str, epoch: int | None = None
    ) -> bool:
        logger.info("kv index: resync of %s (%s)", worker_id, why)
        if epoch is not None and epoch != state.epoch:
            state.epoch = epoch
            self._drop_hashes(worker_id, state)  # a restarted worker's old blocks are gone
        state.resync_since_s = self.clock()
        state.num_resyncs += 1
        self.num_resyncs += 1
        return True

    def _drop_hashes(self, worker_id: str, state: WorkerCacheState) -> None:
        for block_hash in state.hashes:
            self._unhold(block_hash, worker_id)
        state.hashes = set()

    def _unhold(self, block_hash: int, worker_id: str) -> None:
        holders = self._holders.get(block_hash)
        if holders is not None:
            holders.discard(worker_id)
            if not holders:
                del self._holders[block_hash]

    def _count(self, state: WorkerCacheState, num: int) -> None:
        now = self.clock()
        state.num_events += num
        state.recent.append((now, num))
        self._trim(state, now)

    @staticmethod
    def _trim(state: WorkerCacheState, now: float) -> None:
        while state.recent and now - state.recent[0][0] > RATE_WINDOW_S:
            state.recent.popleft()

    def _expire(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            expiry, block_hash, worker_id = self._expiries.popleft()
            spec = self._speculative.get(block_hash)
            if spec is not None and spec.get(worker_id) == expiry:
                del spec[worker_id]
                self._num_speculative[worker_id] -= 1
                if not self._num_speculative[worker_id]:
                    del self._num_speculative[worker_id]
                if not spec:
                    del self._speculative[block_hash]
