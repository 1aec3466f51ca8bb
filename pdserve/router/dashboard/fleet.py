"""The deployment as the dashboard shows it: workers with their state, and what happened to them.

1. :meth:`Fleet.observe` (every sampler tick and every data request) compares
   the registry with what it saw last time: a new worker id is
   ``worker_registered`` (``worker_replaced`` when the id was lost before, or
   its pid changed), a draining flag ``worker_draining``, a worker gone
   ``worker_lost`` (``worker_left`` when it was draining: a clean shutdown).
2. Gone workers stay in the view, with state ``lost`` or ``left``, for
   ``keep_gone_s``, so that the page shows them.
3. The dispatcher's recovery counters are compared too: migrations, retries,
   failed requests, KV timeouts and fallback prefills become events.
4. Optional fields slot in when the registry has them: a worker's ``state``
   (starting, ready, draining...), ``node`` and placement; the pools' target
   sizes come from a ``targets`` callable when a supervisor provides one.

Everything here reads the router's memory: no message goes to a worker.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from pdserve.router.dispatch_config import DispatchCounters
from pdserve.router.registry import Registry, WorkerInfo

#: Recovery counters (``DispatchCounters`` fields) that become events, with the event kind.
COUNTER_EVENTS = {
    "num_migrations": "migration",
    "num_retries": "retry",
    "num_failed": "request_failed",
    "num_kv_timeouts": "kv_timeout",
    "num_fallback_prefills": "fallback_prefill",
}

#: Optional worker attributes copied into the view when the registry entry has them.
OPTIONAL_WORKER_FIELDS = ("state", "node", "node_id", "placement", "restarts")


class EventLog:
    """The latest events, numbered so that a client asks only for those it has not seen."""

    def __init__(self, keep: int = 500) -> None:
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        self.last_seq = 0

    def add(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Record an event now; returns it."""
        self.last_seq += 1
        event = {"seq": self.last_seq, "t": round(time.time(), 3), "kind": kind, **fields}
        self._events.append(event)
        return event

    def after(self, seq: int) -> list[dict[str, Any]]:
        """The kept events numbered above ``seq``, oldest first."""
        return [e for e in self._events if e["seq"] > seq]


def host_name(host_id: str) -> str:
    """The readable part of a worker's host id (``hostname/boot-id/shm-device``)."""
    return host_id.split("/", 1)[0]


class Fleet:
    """Workers (present and recently gone) and the events of their lives."""

    def __init__(
        self,
        registry: Registry,
        counters: DispatchCounters,
        events: EventLog,
        keep_gone_s: float = 120.0,
        targets: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self.registry = registry
        self.counters = counters
        self.events = events
        self.keep_gone_s = keep_gone_s
        self.targets = targets
        self._seen: dict[str, tuple[int, bool]] = {}  # worker id → (pid, draining)
        self._first_seen: dict[str, float] = {}  # worker id → unix time it (last) registered
        self._gone: dict[str, tuple[dict[str, Any], float]] = {}  # worker id → (last view, when)
        self._last_counters = asdict(counters)
        self._last_views: dict[str, dict[str, Any]] = {}  # worker id → its view when last seen

    def observe(self) -> None:
        """Turn what changed since the last call into events."""
        now = time.time()
        current = {w.worker_id: w for w in self.registry.all()}
        for wid, w in current.items():
            seen = self._seen.get(wid)
            if seen is None or seen[0] != w.pid:
                replaced = wid in self._gone or seen is not None
                self._gone.pop(wid, None)
                self._first_seen[wid] = now
                kind = "worker_replaced" if replaced else "worker_registered"
                self.events.add(kind, worker=wid, role=w.role.value, pid=w.pid, host=host_name(w.host_id))
            elif w.draining and not seen[1]:
                self.events.add("worker_draining", worker=wid, role=w.role.value)
            self._seen[wid] = (w.pid, w.draining)
        for wid in [wid for wid in self._seen if wid not in current]:
            _, draining = self._seen.pop(wid)
            view = self._last_views.get(wid)
            state = "left" if draining else "lost"
            if view is not None:
                self._gone[wid] = ({**view, "state": state, "gone_unix_s": round(now, 3)}, now)
            self.events.add(f"worker_{state}", worker=wid, role=view["role"] if view else None)
        for wid in [wid for wid, (_, at) in self._gone.items() if now - at > self.keep_gone_s]:
            del self._gone[wid]
        self._counter_events()
        self._last_views = {wid: self._view(w) for wid, w in current.items()}

    def _counter_events(self) -> None:
        counters = asdict(self.counters)
        for name, kind in COUNTER_EVENTS.items():
            delta = counters[name] - self._last_counters.get(name, 0)
            if delta > 0:
                self.events.add(kind, count=delta)
        self._last_counters = counters

    def _view(self, w: WorkerInfo) -> dict[str, Any]:
        load = w.load
        view: dict[str, Any] = {
            "id": w.worker_id,
            "role": w.role.value,
            "state": "draining" if w.draining else "ready",
            "host": host_name(w.host_id),
            "pid": w.pid,
            "metrics_port": w.metrics_port,
            "running": load.num_running,
            "waiting": load.num_waiting,
            "waiting_kv": load.num_waiting_for_kv,
            "held": load.num_held,
            "kv_total": load.num_total_blocks,
            "kv_free": load.num_free_blocks,
            "kv_used": max(load.num_total_blocks - load.num_free_blocks, 0),
            "kv_cached": load.num_cached_blocks,
            "assigned": w.num_inflight,
            "heartbeat_age_s": round(max(time.monotonic() - w.last_seen_s, 0.0), 3),
            "registered_unix_s": round(self._first_seen.get(w.worker_id, 0.0), 3),
        }
        for name in OPTIONAL_WORKER_FIELDS:
            value = getattr(w, name, None)
            if value is not None:
                view[name] = value if isinstance(value, str | int | float | bool) else str(value)
        return view

    def workers(self) -> list[dict[str, Any]]:
        """Every registered worker, then the recently gone ones, as plain dicts."""
        self._last_views = {w.worker_id: self._view(w) for w in self.registry.all()}
        return [*self._last_views.values(), *(view for view, _ in self._gone.values())]

    def pools(self, workers: list[dict[str, Any]]) -> dict[str, dict[str, int | None]]:
        """Per role: workers serving (``actual``) and the supervisor's ``target`` (None: unknown)."""
        targets = self.targets() if self.targets is not None else {}
        pools: dict[str, dict[str, int | None]] = {}
        for role in ("prefill", "decode", "mixed"):
            actual = sum(1 for w in workers if w["role"] == role and w["state"] not in ("lost", "left"))
            if actual or role in targets:
                pools[role] = {"actual": actual, "target": targets.get(role)}
        return pools
