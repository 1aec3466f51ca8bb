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
4. Under a supervisor (``pdserve serve``; ``deployment``: the router's
   :class:`~pdserve.router.deployment.Deployment`), its view adds the pools'
   targets, each worker's slot (state, host, node, restarts) and the workers
   not registered right now (starting, restarting, failed); target changes
   become ``scaled`` events, slot states ``worker_starting``,
   ``worker_restarting``, ``worker_flipping``, ``worker_failed``, and a worker
   that registers again under another role ``worker_flipped``.

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

#: Slot states of the supervisor that become events when a worker enters them.
SLOT_EVENTS = ("starting", "restarting", "flipping", "failed")


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
        deployment: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """``deployment``: returns the supervisor's view (``Deployment.view``), when there is one."""
        self.registry = registry
        self.counters = counters
        self.events = events
        self.keep_gone_s = keep_gone_s
        self.deployment = deployment
        self._seen: dict[str, tuple[int, bool, str]] = {}  # worker id → (pid, draining, role)
        self._slot_states: dict[str, str] = {}
        self._targets: dict[str, int] | None = None
        self._view: dict[str, Any] = {}  # the supervisor's view, as of the last observe
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
            role = w.role.value
            if seen is None or seen[0] != w.pid:
                replaced = wid in self._gone or seen is not None
                self._gone.pop(wid, None)
                self._first_seen[wid] = now
                kind = "worker_replaced" if replaced else "worker_registered"
                self.events.add(kind, worker=wid, role=role, pid=w.pid, host=host_name(w.host_id))
            elif seen[2] != role:
                self.events.add("worker_flipped", worker=wid, role=role, detail=f"{seen[2]} → {role}")
            elif w.draining and not seen[1]:
                self.events.add("worker_draining", worker=wid, role=role)
            self._seen[wid] = (w.pid, w.draining, role)
        for wid in [wid for wid in self._seen if wid not in current]:
            _, draining, _ = self._seen.pop(wid)
            view = self._last_views.get(wid)
            state = "left" if draining else "lost"
            if view is not None:
                self._gone[wid] = ({**view, "state": state, "gone_unix_s": round(now, 3)}, now)
            self.events.add(f"worker_{state}", worker=wid, role=view["role"] if view else None)
        for wid in [wid for wid, (_, at) in self._gone.items() if now - at > self.keep_gone_s]:
            del self._gone[wid]
        self._counter_events()
        self._deployment_events()
        self._last_views = {wid: self._worker_view(w) for wid, w in current.items()}

    def _deployment_events(self) -> None:
        self._view = self.deployment() if self.deployment is not None else {}
        if not self._view.get("supervised"):
            return
        targets = {
            pool: v["target"] for pool, v in self._view.get("pools", {}).items() if v["target"] is not None
        }
        if self._targets is not None and targets and targets != self._targets:
            changes = [
                f"{p} {self._targets.get(p)} → {n}" for p, n in targets.items() if self._targets.get(p) != n
            ]
            self.events.add("scaled", detail=", ".join(changes))
        self._targets = targets or self._targets
        for slot in self._view.get("workers", []):
            wid, state = slot.get("worker_id"), slot.get("state")
            if state != self._slot_states.get(wid) and state in SLOT_EVENTS:
                detail = (
                    f"to {slot['flip_to']}"
                    if state == "flipping" and slot.get("flip_to")
                    else slot.get("message")
                )
                self.events.add(f"worker_{state}", worker=wid, role=slot.get("role"), detail=detail or None)
            self._slot_states[wid] = state

    def _counter_events(self) -> None:
        counters = asdict(self.counters)
        for name, kind in COUNTER_EVENTS.items():
            delta = counters[name] - self._last_counters.get(name, 0)
            if delta > 0:
                self.events.add(kind, count=delta)
        self._last_counters = counters

    def _worker_view(self, w: WorkerInfo) -> dict[str, Any]:
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
        return view

    @property
    def supervision(self) -> dict[str, Any]:
        """The supervisor's view as of the last :meth:`observe` (empty when there is none)."""
        return self._view

    def workers(self) -> list[dict[str, Any]]:
        """Every registered worker, the supervisor's other slots, then the recently gone ones."""
        self._last_views = {w.worker_id: self._worker_view(w) for w in self.registry.all()}
        views = {**self._last_views}
        gone = {wid: view for wid, (view, _) in self._gone.items()}
        for slot in self._view.get("workers", []) if self._view.get("supervised") else []:
            wid = slot.get("worker_id")
            base = views.get(wid) or gone.get(wid)
            if base is None:  # not registered now: starting, restarting, failed
                base = views[wid] = {
                    **_EMPTY_LOAD,
                    "id": wid,
                    "role": slot.get("flip_to") or slot.get("role"),
                    "state": slot.get("state"),
                    "pid": slot.get("pid") or 0,
                }
            base["slot_state"] = slot.get("state")
            base["restarts"] = slot.get("restarts", 0)
            if slot.get("host"):
                base["host"] = slot["host"]
            if slot.get("node_id"):
                base["node"] = slot["node_id"]
            if base["state"] in ("ready", "draining") and slot.get("state") in ("flipping", "draining"):
                base["state"] = slot["state"]
        return [*views.values(), *(view for wid, view in gone.items() if wid not in views)]

    def pools(self, workers: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Per role: workers serving (``actual``) and the supervisor's ``target`` (None: unsupervised)."""
        supervised = self._view.get("pools", {}) if self._view.get("supervised") else {}
        pools: dict[str, dict[str, Any]] = {}
        for role in ("prefill", "decode", "mixed"):
            actual = sum(1 for w in workers if w["role"] == role and w["state"] in ("ready", "flipping"))
            target = supervised.get(role, {}).get("target")
            if actual or target or any(w["role"] == role for w in workers):
                pools[role] = {"actual": actual, "target": target}
        return pools


#: The load fields of a worker that is not registered (no heartbeat to read them from).
_EMPTY_LOAD = {
    "host": "",
    "metrics_port": 0,
    "running": 0,
    "waiting": 0,
    "waiting_kv": 0,
    "held": 0,
    "kv_total": 0,
    "kv_free": 0,
    "kv_used": 0,
    "kv_cached": 0,
    "assigned": 0,
    "heartbeat_age_s": None,
    "registered_unix_s": None,
}
