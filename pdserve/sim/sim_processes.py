"""The supervisor's backend and the router's channel in simulated time (:mod:`pdserve.sim.elastic`).

The real :class:`~pdserve.launch.supervisor.Supervisor` drives these as it drives local processes
or Ray actors (:mod:`pdserve.launch.base`'s contract); the real
:class:`~pdserve.router.deployment.Deployment` sends ``Flip`` and ``SetThreads`` through
:class:`SimChannel`. What a process does — registering after its start time, draining, flipping,
changing its threads — is the :class:`Host`'s (the :class:`~pdserve.sim.elastic.PlannedSimulator`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pdserve.launch.base import Placement, WorkerSpec
from pdserve.router.registry import Registry
from pdserve.worker import protocol as p


class Host(Protocol):
    """What the simulated processes need of the simulator."""

    def start_process(self, worker_id: str, role: str, threads: int = 0) -> SimProcess:
        """Start a worker process with ``threads`` (0: the profile's) torch threads (it registers later)."""

    def check_drained(self, proc: SimProcess) -> None:
        """A draining process that has finished exits (or completes its flip)."""

    def leave(self, proc: SimProcess) -> None:
        """The process exited: the router forgets its worker."""

    def flip(self, worker_id: str, role: str) -> None:
        """The router sent the worker ``Flip``."""

    def set_threads(self, worker_id: str, threads: int) -> None:
        """The router sent the worker ``SetThreads``."""


class SimProcess:
    """A simulated worker process (the supervisor's :class:`~pdserve.launch.base.ProcessHandle`)."""

    def __init__(self, sim: Host, worker_id: str, role: str) -> None:
        self.sim, self.name, self.role = sim, worker_id, role
        self.up = False  # registered
        self.stopping = False  # terminated: drains, then exits
        self.flip_to: str | None = None  # received a Flip: drains, then changes role
        self.flip_done_at: float | None = None
        self.exit_code: int | None = None
        self.threads = 0  # torch threads it computes with

    def poll(self) -> int | None:
        """None while it runs (starting, serving, draining, flipping), else its exit code."""
        return self.exit_code

    def terminate(self) -> None:
        """SIGTERM: it finishes what it has, then exits (at once when it was not up yet)."""
        if self.exit_code is None:
            self.stopping = True
            if not self.up:
                self.exit_code = 0  # not loaded yet: it just stops
            else:
                self.sim.check_drained(self)

    def kill(self) -> None:
        """SIGKILL: gone now, whatever it was running."""
        if self.exit_code is None:
            self.exit_code = -9
            self.sim.leave(self)

    def placement(self) -> Placement:
        return Placement("sim")


class SimRouterProcess:
    """The router: always running, at a nominal address."""

    name, url, control_endpoint = "router", "sim://router", "sim://control"

    def poll(self) -> int | None:
        return None

    def terminate(self) -> None:
        pass

    def kill(self) -> None:
        pass

    def placement(self) -> Placement:
        return Placement("sim")


class SimBackend:
    """A :class:`~pdserve.launch.base.Backend` whose workers the :class:`Host` simulates."""

    def __init__(self, sim: Host) -> None:
        self.sim = sim

    def start_router(self, args: list[str], env: dict[str, str]) -> SimRouterProcess:
        return SimRouterProcess()

    def start_worker(self, spec: WorkerSpec) -> SimProcess:
        """A worker process of ``spec``'s id, role and threads (the host registers it after its start)."""
        return self.sim.start_process(spec.worker_id, spec.role, spec.threads)

    def close(self) -> None:
        pass


@dataclass
class SimChannel:
    """The dispatcher's channel to the workers, as :class:`Deployment` uses it (``Flip``, ``SetThreads``)."""

    sim: Host

    def send(self, worker_id: str, message: p.Message) -> bool:
        """Deliver ``Flip`` or ``SetThreads`` to the worker (other messages are not the deployment's)."""
        if isinstance(message, p.Flip):  # reaches the worker one hop later, read between its steps
            self.sim.flip(worker_id, message.role)
            return True
        if isinstance(message, p.SetThreads):
            self.sim.set_threads(worker_id, message.threads)
            return True
        return False


@dataclass
class DispatcherStandIn:
    """What :class:`Deployment` uses of the router's dispatcher."""

    registry: Registry
    channel: SimChannel
