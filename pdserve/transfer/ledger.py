"""Bookkeeping shared by all transports: per-request progress and cumulative stats.

Receiver side, :class:`ReceiveLedger`, per request:
1. ``on_blocks`` (first write starts the clock; bytes add up) →
2. ``on_done`` / ``on_abort`` moves it to the finished queue →
3. ``poll`` hands finished requests to D and forgets them
(or ``discard`` forgets a request D gave up on; later writes of it are refused
where the transport can refuse them).

Sender side, :class:`SendLedger`: the same per (peer, request), plus cumulative
:class:`PeerStats` per peer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import msgspec

from pdserve.transfer.base import KVDone, PeerStats, ReceiveStats, TransferStats

logger = logging.getLogger(__name__)

MAX_DISCARDED = 4096  # discarded request ids remembered to refuse their late writes


@dataclass
class Progress:
    """One request's transfer so far."""

    first_s: float  # time.monotonic() of the first byte
    num_bytes: int = 0


class ReceiveLedger:
    """Thread-safe: written by a transport's thread, polled by D's main loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._partial: dict[str, Progress] = {}
        self._finished: deque[KVDone] = deque()
        self._discarded: OrderedDict[str, None] = OrderedDict()
        self._stats = ReceiveStats()

    def is_discarded(self, request_id: str) -> bool:
        return request_id in self._discarded

    def on_blocks(self, request_id: str, num_bytes: int, first_s: float) -> bool:
        """Count bytes written for a request; False if the request was discarded (drop the write)."""
        with self._lock:
            if request_id in self._discarded:
                return False
            p = self._partial.get(request_id)
            if p is None:
                p = self._partial[request_id] = Progress(first_s)
            p.num_bytes += num_bytes
            return True

    def on_done(
        self, request_id: str, payload: bytes, sender_num_bytes: int, sender_first_s: float | None,
        *, count_sender_bytes: bool,
    ) -> None:
        """The sender finished a request.

        ``count_sender_bytes``: the receiver saw no bytes itself (shm), so take
        the sender's count and first-byte time (same host, same monotonic clock).
        """
        now = time.monotonic()
        with self._lock:
            if self._forget_discarded(request_id):
                logger.debug("dropping done of discarded request %s", request_id)
                return
            p = self._partial.pop(request_id, None)
            error = None
            if count_sender_bytes:
                num_bytes = sender_num_bytes
                first_s = sender_first_s if sender_first_s is not None else now
            else:
                num_bytes = p.num_bytes if p else 0
                first_s = p.first_s if p else now
                if num_bytes != sender_num_bytes:
                    error = f"received {num_bytes} bytes but the sender sent {sender_num_bytes}"
            self._finish(KVDone(request_id, payload, num_bytes, max(now - first_s, 0.0), error))

    def on_abort(self, request_id: str, reason: str) -> None:
        now = time.monotonic()
        with self._lock:
            if self._forget_discarded(request_id):
                return
            p = self._partial.pop(request_id, None)
            num_bytes, first_s = (p.num_bytes, p.first_s) if p else (0, now)
            self._finish(KVDone(request_id, b"", num_bytes, now - first_s, reason or "aborted"))

    def _finish(self, done: KVDone) -> None:
        """Queue a finished request for ``poll`` (lock held)."""
        self._finished.append(done)
        self._stats.num_requests += 1
        self._stats.num_failed += done.error is not None
        self._stats.num_bytes += done.num_bytes
        self._stats.transfer_s += done.transfer_s
        self._ready.notify_all()

    def on_rejected(self) -> int:
        """Count a message dropped for a missing or wrong token; returns the count so far."""
        with self._lock:
            self._stats.num_rejected += 1
            return self._stats.num_rejected

    def stats(self) -> ReceiveStats:
        with self._lock:
            return ReceiveStats(**msgspec.structs.asdict(self._stats))

    def _forget_discarded(self, request_id: str) -> bool:
        """True if the request was discarded (its last message has now arrived)."""
        if request_id in self._discarded:
            del self._discarded[request_id]
            return True
        return False

    def discard(self, request_id: str) -> None:
        with self._lock:
            self._partial.pop(request_id, None)
            self._discarded[request_id] = None
            while len(self._discarded) > MAX_DISCARDED:
                self._discarded.popitem(last=False)

    def poll(self, timeout_s: float = 0.0) -> list[KVDone]:
        """Finished requests; waits up to ``timeout_s`` for the first one (0: never blocks)."""
        if not self._finished and timeout_s <= 0:  # cheap check without the lock: D polls every step
            return []
        with self._lock:
            if not self._finished:
                self._ready.wait_for(lambda: bool(self._finished), timeout_s)
            out = list(self._finished)
            self._finished.clear()
        return out

    @property
    def num_partial(self) -> int:
        return len(self._partial)


class SendLedger:
    """Per (peer, request) progress and per-peer cumulative stats of one sender."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: dict[str, PeerStats] = {}
        self._pending: dict[tuple[str, str], Progress] = {}

    def add_peer(self, peer_id: str, transport: str) -> None:
        with self._lock:
            old = self._stats.get(peer_id)
            if old is None or old.transport != transport:
                self._stats[peer_id] = PeerStats(transport)

    def drop_peer(self, peer_id: str) -> None:
        """Forget the peer's unfinished requests (its cumulative stats stay)."""
        with self._lock:
            for key in [k for k in self._pending if k[0] == peer_id]:
                del self._pending[key]

    def on_blocks(self, peer_id: str, request_id: str, num_bytes: int, start_s: float, end_s: float) -> None:
        with self._lock:
            p = self._pending.get((peer_id, request_id))
            if p is None:
                p = self._pending[(peer_id, request_id)] = Progress(start_s)
            p.num_bytes += num_bytes
            s = self._stats[peer_id]
            s.num_bytes += num_bytes
            s.num_block_sends += 1
            s.send_s += end_s - start_s

    def pending(self, peer_id: str, request_id: str) -> Progress | None:
        return self._pending.get((peer_id, request_id))

    def on_finish(self, peer_id: str, request_id: str, start_s: float, end_s: float, aborted: bool) -> None:
        with self._lock:
            p = self._pending.pop((peer_id, request_id), None)
            s = self._stats[peer_id]
            s.send_s += end_s - start_s
            if aborted:
                s.num_aborted += 1
            else:
                s.num_requests += 1
                s.transfer_s += end_s - (p.first_s if p else start_s)

    def snapshot(self) -> TransferStats:
        with self._lock:
            return TransferStats({k: PeerStats(**msgspec.structs.asdict(v)) for k, v in self._stats.items()})
