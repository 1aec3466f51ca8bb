"""One worker place the supervisor keeps filled (see :mod:`pdserve.launch.supervisor`).

Slot states (shown by ``/pdserve/workers`` and ``pdserve status``):
``starting`` (started, not registered yet), ``ready``, ``draining`` (being
removed), ``flipping`` (changing role), ``restarting`` (exited; waiting out its
backoff), ``failed`` (given up on; a later ``pdserve scale`` of its pool
replaces it). A slot's ``threads`` change with the deployment's threads
target (:mod:`pdserve.launch.threads`).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from pdserve.launch.base import ProcessHandle


@dataclass
class Slot:
    """One worker the supervisor runs (its id and role survive restarts; a flip changes the role)."""

    worker_id: str
    role: str
    state: str = "starting"
    handle: ProcessHandle | None = None
    started_s: float = 0.0
    registered_s: float | None = None  # since when it has been registered (this start)
    ever_registered: bool = False  # this start
    exits: collections.deque[float] = field(default_factory=collections.deque)
    consecutive_exits: int = 0
    start_failures: int = 0
    restarts: int = 0
    next_start_s: float = 0.0
    last_exit: int | None = None
    message: str = ""
    flip_to: str | None = None
    flip_started_s: float = 0.0
    num_inflight: int = 0
    threads: int = 0  # torch threads its process was started with, or last reported (0: not known)
    threads_to: int | None = None  # told to change to this count, not reported yet (launch/threads.py)
    threads_sent_s: float = 0.0

    def view(self) -> dict[str, Any]:
        """JSON view of the slot (see docs/scaling.md)."""
        place = self.handle.placement() if self.handle is not None and self.state != "restarting" else None
        return {
            "worker_id": self.worker_id,
            "role": self.role,
            "state": self.state,
            "flip_to": self.flip_to,
            "host": place.host if place else "",
            "node_id": place.node_id if place else "",
            "pid": place.pid if place else 0,
            "restarts": self.restarts,
            "last_exit_code": self.last_exit,
            "message": self.message,
            "threads": self.threads,
            "threads_to": self.threads_to,
        }


def pick_victim(active: list[Slot]) -> Slot | None:
    """Who leaves a pool of ``active`` slots: a dead or failed slot, else a starting one, else the least
    loaded (a flipping one never)."""
    order = {"failed": 0, "restarting": 1, "starting": 2, "ready": 3}
    candidates = [s for s in active if s.state in order and s.flip_to is None]
    if not candidates:
        return None
    return min(candidates, key=lambda s: (order[s.state], s.num_inflight))


def has_path(slots: list[Slot]) -> bool:
    """A prefill+decode pair or a mixed worker among ``slots``."""
    up = {s.role for s in slots}
    return "mixed" in up or {"prefill", "decode"} <= up
