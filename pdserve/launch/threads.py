"""The torch threads of a supervised deployment's workers, changed while it runs.

``pdserve scale --threads N`` (``POST /pdserve/scale`` with ``"threads": N``)
sets the router's *threads target*; the supervisor gets it in every sync
reply and brings each worker to it (docs/scaling.md):

1. A worker it starts (a new slot, a restart) gets the target in its spec
   (:func:`with_threads`: ``--threads N`` and ``OMP_NUM_THREADS``).
2. A ready worker with another count is told ``SetThreads(N)`` through the
   router (the sync's ``set_threads``): at once when that lowers its count;
   a raise waits until no slot is draining or starting and no lowering is
   still unconfirmed, so that the cores a reshape frees are free before
   another worker takes them (2 workers × 1 thread → 1 × 2 stops one worker
   first, then gives the other its second thread).
3. A worker counts as changed once the router reports its new count (from
   its heartbeats, in the sync reply's ``workers``), not when it was told;
   one not reported within :data:`RESEND_S` is told again.

With no target (``None``: as each worker was started) nothing is changed.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from pdserve.launch.base import WorkerSpec
from pdserve.launch.slot import Slot

logger = logging.getLogger(__name__)

#: A ``SetThreads`` the router has not reported applied after this long is sent again.
RESEND_S = 3.0
#: Slot states during which no worker's thread count is raised (cores are not free yet).
HOLD_RAISES = ("draining", "starting")


def with_threads(spec: WorkerSpec, threads: int | None) -> WorkerSpec:
    """``spec`` with ``threads`` torch threads (None: unchanged); a worker takes its last ``--threads``."""
    if not threads:
        return spec
    return dataclasses.replace(spec, threads=threads, args=[*spec.args, "--threads", str(threads)])


def parse_target(value: object) -> int | None:
    """The threads target of a sync reply: a positive int, or None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def reconcile_threads(
    slots: list[Slot], registered: dict[str, dict[str, Any]], target: int | None, now: float
) -> dict[str, int]:
    """Note what the router reports of each ready slot; return the ``SetThreads`` to send (id → count).

    Call after the pools' reconcile of the same pass (its drains hold raises back).
    """
    for slot in slots:
        reported = _reported(slot, registered)
        if not reported:
            continue
        if slot.threads_to is not None and reported == slot.threads_to:
            logger.info("%s now computes with %d threads (was %d)", slot.worker_id, reported, slot.threads)
            slot.threads_to = None
        slot.threads = reported
    if target is None:
        for slot in slots:
            slot.threads_to = None
        return {}
    ready = [s for s in slots if _reported(s, registered)]  # (not ready: its start or flip sees to it)
    send: dict[str, int] = {}
    for slot in ready:
        if slot.threads_to is not None and slot.threads_to != target:
            slot.threads_to = None  # the target changed again before it was applied: decide afresh
        elif slot.threads_to is not None and now - slot.threads_sent_s >= RESEND_S:
            logger.warning("%s has not reported %d threads %.0f s after it was told; telling it again",
                           slot.worker_id, target, now - slot.threads_sent_s)
            send[slot.worker_id], slot.threads_sent_s = target, now
    for raising in (False, True):  # lowerings first: a raise waits for them
        if raising and (any(s.state in HOLD_RAISES for s in slots)
                        or any(s.threads_to is not None and s.threads_to < s.threads for s in ready)):
            break
        for slot in ready:
            if slot.threads_to is None and slot.threads != target and (target > slot.threads) == raising:
                logger.info("%s: %d -> %d threads", slot.worker_id, slot.threads, target)
                send[slot.worker_id] = slot.threads_to = target
                slot.threads_sent_s = now
    return send


def _reported(slot: Slot, registered: dict[str, dict[str, Any]]) -> int:
    """The thread count the router reports of a ready slot's worker (0: none, or not ready)."""
    if slot.state != "ready":
        return 0
    return int(registered.get(slot.worker_id, {}).get("threads") or 0)
