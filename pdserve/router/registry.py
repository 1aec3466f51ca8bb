"""The router's view of its workers: who is registered, alive and how loaded.

Lifecycle of a worker entry:

1. ``Register`` adds it (a re-registration replaces the old entry).
2. Every ``Heartbeat`` renews its lease and updates its load. A heartbeat
   that reports another torch thread count than before (``SetThreads``)
   drops the worker's measured speed: its step times changed.
3. A draining worker (shutting down) stays registered but gets no new
   requests; a worker whose lease ran out (``expire``), or whose connection
   is gone, is removed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pdserve.config import Role
from pdserve.router.worker_perf import WorkerPerf
from pdserve.transfer.descriptor import KVDescriptor
from pdserve.worker.protocol import Register, WorkerLoad


@dataclass
class WorkerInfo:
    """One registered worker."""

    worker_id: str
    role: Role
    model: str
    pid: int
    host_id: str
    max_model_len: int
    block_size: int
    num_blocks: int
    kv: KVDescriptor | None
    metrics_port: int = 0
    load: WorkerLoad = field(default_factory=WorkerLoad)
    last_seen_s: float = field(default_factory=time.monotonic)
    num_inflight: int = 0  # requests the router assigned and has not seen finish
    draining: bool = False  # shutting down: finishes what it has, gets nothing new
    perf: WorkerPerf = field(default_factory=WorkerPerf)  # measured rates, queued prompt tokens
    threads: int = 0  # torch threads it reported last (0: not reported)

    @classmethod
    def from_register(cls, m: Register) -> WorkerInfo:
        """Build an entry from a registration message."""
        return cls(
            worker_id=m.worker_id,
            role=Role(m.role),
            model=m.model,
            pid=m.pid,
            host_id=m.host_id,
            max_model_len=m.max_model_len,
            block_size=m.block_size,
            num_blocks=m.num_blocks,
            kv=m.kv,
            metrics_port=m.metrics_port,
            threads=m.threads,
        )


class Registry:
    """Registered workers by id, with heartbeat leases."""

    def __init__(self, lease_s: float = 30.0) -> None:
        self.lease_s = lease_s
        self._workers: dict[str, WorkerInfo] = {}

    def add(self, info: WorkerInfo) -> None:
        """Register (or re-register) a worker."""
        self._workers[info.worker_id] = info

    def get(self, worker_id: str) -> WorkerInfo | None:
        """The entry of a worker, if registered."""
        return self._workers.get(worker_id)

    def heartbeat(self, worker_id: str, load: WorkerLoad) -> bool:
        """Renew a lease; False when the worker is unknown (it should register again)."""
        info = self._workers.get(worker_id)
        if info is None:
            return False
        info.load = load
        if load.threads and load.threads != info.threads:
            if info.threads:
                info.perf.forget_speed()  # its step times changed with its thread count
            info.threads = load.threads
        info.perf.on_heartbeat(load)
        info.last_seen_s = time.monotonic()
        return True

    def remove(self, worker_id: str) -> WorkerInfo | None:
        """Forget a worker."""
        return self._workers.pop(worker_id, None)

    def expire(self, now_s: float | None = None) -> list[WorkerInfo]:
        """Remove and return the workers whose lease ran out."""
        now_s = time.monotonic() if now_s is None else now_s
        dead = [w for w in self._workers.values() if now_s - w.last_seen_s > self.lease_s]
        for w in dead:
            del self._workers[w.worker_id]
        return dead

    def by_role(self, role: Role) -> list[WorkerInfo]:
        """Registered workers of one role that take new requests, in registration order."""
        return [w for w in self._workers.values() if w.role is role and not w.draining]

    def all(self) -> list[WorkerInfo]:
        """Every registered worker."""
        return list(self._workers.values())

    @property
    def disaggregated_ready(self) -> bool:
        """At least one prefill and one decode worker."""
        return bool(self.by_role(Role.PREFILL)) and bool(self.by_role(Role.DECODE))

    @property
    def ready(self) -> bool:
        """Requests can be served: a prefill+decode pair, or a mixed worker."""
        return self.disaggregated_ready or bool(self.by_role(Role.MIXED))
