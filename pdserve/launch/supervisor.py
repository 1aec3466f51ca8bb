"""Keeps a deployment at its target shape, whatever backend runs its processes.

The supervisor owns *slots*: one per worker it means to run, each with a
stable worker id and a role. It drives a :class:`~pdserve.launch.base.Backend`
(local child processes, Ray actors) and talks to the router over HTTP only, so
nothing here assumes where a process runs.

One pass of the loop (:meth:`Supervisor.step`, every ``sync_interval_s``):

1. Poll every handle. A worker that exited unexpectedly is restarted with the
   same worker id and role after a backoff (``backoff_initial_s`` doubling to
   ``backoff_max_s``; it resets once the worker has stayed registered for
   ``crash_loop_window_s``). A slot whose worker exited ``crash_loop_exits``
   times within ``crash_loop_window_s``, or ``max_start_failures`` times in a
   row before it ever registered (it cannot start: a bad model path), is
   marked ``failed`` with one log line and not restarted; the others keep
   serving. A router that exits is restarted on the same ports (workers
   reconnect and register again); if that fails the deployment ends.
2. Sync with the router (``POST /pdserve/supervisor``, authenticated by the
   cluster secret): send the slots' view and the drains/flips decided last
   pass; get back the target pool sizes and threads (``pdserve scale`` sets
   them on the router) and the registered workers with their load.
3. Reconcile each pool with its target. A pool that is short gets a flip of a
   registered worker from a pool that is over (no new process, no weight
   reload) or else a new worker. A pool that is over loses its least-loaded
   worker: the router stops routing to it (drain), then it is asked to stop
   (SIGTERM: it finishes its requests first). Stops wait while another slot
   is starting or flipping (make before break). Then bring the workers to
   the threads target, if one is set (:mod:`pdserve.launch.threads`).

Slot states: :mod:`pdserve.launch.slot`. Configuration: :mod:`pdserve.launch.supervisor_config`.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pdserve.launch.base import Backend, RouterHandle, WorkerSpec
from pdserve.launch.router_link import HttpLink, RouterLink
from pdserve.launch.slot import Slot, has_path, pick_victim
from pdserve.launch.stop_signals import StopSignals
from pdserve.launch.supervisor_config import ROLES, SupervisorConfig
from pdserve.launch.threads import parse_target, reconcile_threads, with_threads

logger = logging.getLogger(__name__)

#: Builds the spec of worker ``worker_id`` with ``role`` for the router's control endpoint.
SpecFactory = Callable[[str, str, str], WorkerSpec]


class RouterGone(RuntimeError):
    """The router exited and could not be restarted: the deployment ends."""


class Supervisor:
    """Starts a deployment through ``backend`` and keeps it at its targets (see the module docstring)."""

    def __init__(
        self,
        config: SupervisorConfig,
        backend: Backend,
        make_spec: SpecFactory,
        link: RouterLink | None = None,
    ) -> None:
        for role, n in config.targets.items():
            if role not in ROLES or n < 0:
                raise ValueError(f"bad target {role}={n}")
        self.config = config
        self.backend = backend
        self.make_spec = make_spec
        self.targets = {r: config.targets.get(r, 0) for r in ROLES}
        self.threads_target: int | None = None  # the router's; None: as make_spec says
        self.slots: list[Slot] = []
        self.router: RouterHandle | None = None
        self._router_exits: collections.deque[float] = collections.deque()
        self._next_ids = dict.fromkeys(ROLES, 0)
        self._pending_drain: list[str] = []
        self._pending_flip: dict[str, str] = {}
        self._pending_threads: dict[str, int] = {}
        self._generation = -1
        self._registered: dict[str, dict[str, Any]] = {}
        self._synced = False
        self._stop = threading.Event()
        self._signals = StopSignals(self._stop)
        self._http = HttpLink(config.secret, config.api_key) if link is None else None
        self._link: RouterLink = link or self._http  # type: ignore[assignment]

    # -- start-up and shutdown ------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL of the router's HTTP API."""
        assert self.router is not None, "not started"
        return self.router.url

    def start(self) -> None:
        """Start the router and the initial workers; return once every worker registered or failed.

        Raises RuntimeError when no complete serving path came up (every
        worker of a needed pool failed), TimeoutError past ``ready_timeout_s``.
        """
        c = self.config
        self.launch()
        deadline = time.monotonic() + c.ready_timeout_s
        while not self._stop.is_set():
            self.step()
            if self._synced and all(s.state in ("ready", "failed") for s in self.slots):
                break
            if time.monotonic() > deadline:
                waiting = ", ".join(s.worker_id for s in self.slots if s.state != "ready")
                raise TimeoutError(f"workers not registered within {c.ready_timeout_s:.0f} s: {waiting}")
            self._stop.wait(c.sync_interval_s)
        if self._stop.is_set():
            return
        failed = [s for s in self.slots if s.state == "failed"]
        if not has_path([s for s in self.slots if s.state == "ready"]):
            reasons = "; ".join(f"{s.worker_id}: {s.message}" for s in failed)
            raise RuntimeError(f"no complete serving path came up ({reasons})")
        for s in failed:
            logger.error("%s could not start: %s (serving without it)", s.worker_id, s.message)

    def launch(self, now: float | None = None) -> None:
        """Start the router and a slot per initial worker, without waiting (:meth:`start` waits)."""
        c = self.config
        self.router = self.backend.start_router([*c.router_args, "--port", str(c.port),
                                                 "--control-port", "0"], c.env)
        for role in ROLES:
            for _ in range(self.targets[role]):
                self._add_slot(role, now)

    def stop_on_signals(self) -> None:
        """SIGINT/SIGTERM make :meth:`start`/:meth:`run` return from now on (main thread only); a second
        one during :meth:`close` stops every process without draining (``launch/stop_signals.py``)."""
        self._signals.install()

    def run(self) -> int:
        """Supervise until stopped (0; see :meth:`stop_on_signals`) or the router cannot be restarted (1)."""
        while not self._stop.wait(self.config.sync_interval_s):
            try:
                self.step()
            except RouterGone as exc:
                logger.error("%s; stopping the deployment", exc)
                return 1
        return 0

    @property
    def stopping(self) -> bool:
        """A stop was requested."""
        return self._stop.is_set()

    def request_stop(self) -> None:
        """Make :meth:`start` and :meth:`run` return (from a signal handler or another thread)."""
        self._stop.set()

    def close(self) -> None:
        """Stop every process (workers drain first), free what the backend holds; start nothing more."""
        self._stop.set()
        if self._http is not None:
            self._http.close()
        self._signals.close(self.backend.close)

    # -- one pass -----------------------------------------------------------------------------

    def step(self, now: float | None = None) -> None:
        """One pass: poll processes, sync with the router, reconcile pools (module docstring); none
        once stopping (a signal, :meth:`close`), and a signal during a pass starts nothing more."""
        if self._stop.is_set():
            return
        now = time.monotonic() if now is None else now
        self._check_router(now)
        for slot in list(self.slots):
            self._check_slot(slot, now)
        self._sync(now)
        if self._synced:
            self._reconcile(now)

    def _check_router(self, now: float) -> None:
        assert self.router is not None
        code = self.router.poll()
        if code is None or self._stop.is_set():
            return  # running, or it exited because the deployment is stopping
        window = self.config.crash_loop_window_s
        self._router_exits.append(now)
        while self._router_exits and now - self._router_exits[0] > window:
            self._router_exits.popleft()
        if len(self._router_exits) >= self.config.crash_loop_exits:
            raise RouterGone(f"the router exited {len(self._router_exits)} times in {window:.0f} s")
        http_port = self.router.url.rsplit(":", 1)[1]
        control_port = self.router.control_endpoint.rsplit(":", 1)[1]
        logger.warning("router exited with code %s; restarting it on ports %s/%s", code, http_port,
                       control_port)
        args = [*self.config.router_args, "--port", http_port, "--control-port", control_port]
        try:
            self.router = self.backend.start_router(args, self.config.env)
        except (RuntimeError, TimeoutError, OSError) as exc:
            raise RouterGone(f"the router could not be restarted: {exc}") from exc
        self._generation = -1  # a new router knows no targets: seed it with ours

    def _check_slot(self, slot: Slot, now: float) -> None:
        c = self.config
        if slot.state == "restarting":
            if now >= slot.next_start_s:
                slot.restarts += 1
                self._start(slot, now)
            return
        if slot.handle is None or slot.state == "failed":
            return
        code = slot.handle.poll()
        if code is None:
            reg = self._registered.get(slot.worker_id)
            if slot.state == "flipping" and now - slot.flip_started_s > c.flip_timeout_s:
                logger.warning("%s did not finish its flip in %.0f s; restarting it as %s",
                               slot.worker_id, c.flip_timeout_s, slot.flip_to)
                slot.handle.kill()
            elif reg is not None and slot.registered_s is not None and \
                    now - slot.registered_s >= c.crash_loop_window_s:
                slot.consecutive_exits = 0
            return
        slot.last_exit = code
        if slot.state == "draining":
            logger.info("%s stopped (scaled down, exit code %s)", slot.worker_id, code)
            self.slots.remove(slot)
            return
        if slot.flip_to is not None:  # died mid-flip: come back in the new role
            slot.role, slot.flip_to = slot.flip_to, None
        slot.exits.append(now)
        while slot.exits and now - slot.exits[0] > c.crash_loop_window_s:
            slot.exits.popleft()
        slot.consecutive_exits += 1
        slot.start_failures = 0 if slot.ever_registered else slot.start_failures + 1
        slot.handle = None
        if slot.start_failures >= c.max_start_failures:
            self._fail(slot, f"cannot start: exited {slot.start_failures} times before registering "
                             f"(last exit code {code})")
        elif len(slot.exits) >= c.crash_loop_exits:
            self._fail(slot, f"crash loop: {len(slot.exits)} exits in {c.crash_loop_window_s:.0f} s "
                             f"(last exit code {code})")
        else:
            delay = min(c.backoff_initial_s * 2 ** (slot.consecutive_exits - 1), c.backoff_max_s)
            logger.warning("%s (%s) exited with code %s; restarting it in %.1f s", slot.worker_id,
                           slot.role, code, delay)
            slot.state, slot.next_start_s = "restarting", now + delay
            slot.message = f"exited with code {code}"

    def _fail(self, slot: Slot, message: str) -> None:
        slot.state, slot.message = "failed", message
        logger.error("%s (%s) is not restarted any more: %s; the other workers keep serving",
                     slot.worker_id, slot.role, message)

    # -- router sync ------------------------------------------------------------------------------

    def _sync(self, now: float) -> None:
        assert self.router is not None
        body = {
            "launcher": self.config.launcher,
            "targets": self.targets,
            "generation": self._generation,
            "slots": [s.view() for s in self.slots],
            "drain": list(self._pending_drain),
            "flip": dict(self._pending_flip),
            "threads": self.threads_target,
            "set_threads": dict(self._pending_threads),
        }
        data = self._link(self.router.url, body)
        if data is None:
            return
        self._synced = True
        for wid in self._pending_drain:
            slot = self._slot(wid)
            if slot is not None and slot.handle is not None:
                slot.handle.terminate()  # the router routes nothing new to it any more
        self._pending_drain.clear()
        self._pending_flip.clear()
        self._pending_threads.clear()
        generation = int(data.get("generation", 0))
        if generation != self._generation:
            new = {r: int(data["targets"].get(r, 0)) for r in ROLES}
            if self._generation >= 0 and new != self.targets:
                logger.info("new targets %s (were %s)", new, self.targets)
                changed = {r for r in ROLES if new[r] != self.targets[r]}
                for slot in [s for s in self.slots if s.state == "failed" and s.role in changed]:
                    self.slots.remove(slot)  # the operator asked again: try afresh
            threads = parse_target(data.get("threads"))
            if self._generation >= 0 and threads != self.threads_target:
                logger.info("new threads target %s (was %s)", threads, self.threads_target)
            self.targets, self.threads_target, self._generation = new, threads, generation
        self._registered = {w["worker_id"]: w for w in data.get("workers", [])}
        for slot in self.slots:
            self._observe(slot, now)

    def _observe(self, slot: Slot, now: float) -> None:
        """Update a slot's state from what the router has registered."""
        reg = self._registered.get(slot.worker_id)
        if reg is not None and slot.handle is not None:
            pid = slot.handle.placement().pid
            if pid and reg.get("pid") and reg["pid"] != pid:
                reg = None  # the entry of an earlier, dead process
        slot.num_inflight = int(reg.get("num_inflight", 0)) if reg else 0
        if slot.state == "flipping" and slot.flip_to is not None:
            if reg is not None and reg["role"] == slot.flip_to and not reg.get("draining"):
                logger.info("%s flipped %s -> %s in %.2f s", slot.worker_id, slot.role, slot.flip_to,
                            now - slot.flip_started_s)
                slot.role, slot.flip_to, slot.state = slot.flip_to, None, "ready"
            return
        if slot.state == "starting" and reg is not None and reg["role"] == slot.role:
            slot.state, slot.registered_s, slot.ever_registered = "ready", now, True
            slot.message = ""
            logger.info("%s (%s) registered %.1f s after its start", slot.worker_id, slot.role,
                        now - slot.started_s)
        elif slot.state == "ready" and reg is None:
            slot.registered_s = None  # lost (e.g. the router restarted); it registers again
            slot.state = "starting"

    # -- reconcile ------------------------------------------------------------------------------

    def _active(self, role: str) -> list[Slot]:
        """Slots that fill a place in ``role``'s pool (a flipping one counts for its new role)."""
        return [s for s in self.slots if (s.flip_to or s.role) == role and s.state != "draining"]

    def _reconcile(self, now: float) -> None:
        surplus = {r: len(self._active(r)) - self.targets[r] for r in ROLES}
        busy = any(s.state in ("starting", "flipping") for s in self.slots)
        for role in ROLES:
            while surplus[role] > 0:
                victim = pick_victim(self._active(role))
                if victim is None:
                    break
                short = [r for r in ROLES if surplus[r] < 0]
                if victim.state == "ready" and short and self.config.allow_flips:
                    self._flip(victim, short[0], now)
                    surplus[short[0]] += 1
                    busy = True  # a stop in this pass would break before the flip makes
                elif victim.state in ("restarting", "failed"):
                    self.slots.remove(victim)
                elif victim.state == "starting" or not busy:
                    self._drain(victim)
                else:
                    break  # make before break: wait for the starting/flipping ones first
                surplus[role] -= 1
        for role in ROLES:
            for _ in range(-surplus[role]):
                self._add_slot(role, now)
        target = self.threads_target
        self._pending_threads.update(reconcile_threads(self.slots, self._registered, target, now))

    def _drain(self, slot: Slot) -> None:
        logger.info("%s (%s): draining, then stopping it (scale down)", slot.worker_id, slot.role)
        slot.state = "draining"
        self._pending_drain.append(slot.worker_id)

    def _flip(self, slot: Slot, role: str, now: float) -> None:
        logger.info("%s: flipping %s -> %s", slot.worker_id, slot.role, role)
        slot.state, slot.flip_to, slot.flip_started_s = "flipping", role, now
        self._pending_flip[slot.worker_id] = role

    def _add_slot(self, role: str, now: float | None = None) -> Slot:
        taken = {s.worker_id for s in self.slots}
        while (wid := f"{role}-{self._next_ids[role]}") in taken:
            self._next_ids[role] += 1
        self._next_ids[role] += 1
        slot = Slot(wid, role)
        self.slots.append(slot)
        self._start(slot, time.monotonic() if now is None else now)
        return slot

    def _start(self, slot: Slot, now: float) -> None:
        assert self.router is not None
        if self._stop.is_set():  # a signal came during this pass: close() stops what runs
            slot.state, slot.handle = "restarting", None
            return
        spec = with_threads(self.make_spec(slot.worker_id, slot.role, self.router.control_endpoint),
                            self.threads_target)
        slot.state, slot.started_s, slot.threads, slot.threads_to = "starting", now, spec.threads, None
        slot.registered_s, slot.ever_registered = None, False
        try:
            slot.handle = self.backend.start_worker(spec)
        except Exception as exc:  # a backend that cannot place it (no resources, ...)
            slot.handle = None
            slot.start_failures += 1
            slot.exits.append(now)
            if slot.start_failures >= self.config.max_start_failures:
                self._fail(slot, f"cannot start: {exc}")
            else:
                slot.state, slot.next_start_s = "restarting", now + self.config.backoff_max_s / 10
                slot.message = f"start failed: {exc}"

    # -- helpers ----------------------------------------------------------------------------------

    def _slot(self, worker_id: str) -> Slot | None:
        return next((s for s in self.slots if s.worker_id == worker_id), None)

    def view(self) -> dict[str, Any]:
        """Targets and slots, as sent to the router."""
        return {"targets": dict(self.targets), "threads": self.threads_target,
                "slots": [s.view() for s in self.slots]}
