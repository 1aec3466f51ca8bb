"""The seam between a deployment's supervisor and where its processes run.

A *backend* starts the router and workers somewhere (child processes on this
host; Ray actors on a cluster) and hands back *handles*; the supervisor
(``pdserve.launch.supervisor``) owns everything above that: restarts with
backoff, crash-loop detection, target pool sizes, drain-then-stop, role flips.
Every backend is driven the same way, so supervision and ``pdserve scale``
behave the same locally and on Ray.

Contract:

1. ``start_router(args)`` starts ``pdserve router`` with ``args`` and returns
   once it has bound its ports: the handle knows its HTTP URL and the control
   endpoint workers register with.
2. ``start_worker(spec)`` starts one ``pdserve worker`` and returns at once
   (loading the model is the worker's business; it registers when ready).
3. ``handle.poll()`` is ``None`` while the process runs and its exit code
   (negative: killed by that signal) once it has ended; it never blocks.
4. ``handle.terminate()`` asks for a graceful stop (the worker drains);
   ``handle.kill()`` stops it now. Both may be called on an ended process.
5. ``close()`` stops whatever the backend still runs and frees what it holds
   (temporary files, a Ray connection it opened). The backend owns its
   processes: nothing it started survives ``close()``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """Where a process runs.

    Attributes:
        host: host name (or IP) of the machine.
        node_id: the Ray node id on Ray (simulated nodes share one IP); empty locally.
        pid: process id on that host (0 when not known).
    """

    host: str
    node_id: str = ""
    pid: int = 0


@dataclass(frozen=True)
class WorkerSpec:
    """One worker to start.

    Attributes:
        worker_id: the id it registers under (stable across restarts of the same slot).
        role: ``prefill``, ``decode`` or ``mixed``.
        args: arguments after ``pdserve worker`` (role, router endpoint, engine options...).
        threads: torch threads (``OMP_NUM_THREADS``); 0 leaves the default.
        env: extra environment variables (the cluster secret among them).
        resources: backend placement request (Ray resources such as ``{"num_gpus": 1}``
            or ``{"prefill_node": 1}``); the local backend ignores it.
    """

    worker_id: str
    role: str
    args: list[str]
    threads: int = 0
    env: dict[str, str] = field(default_factory=dict)
    resources: dict[str, float] = field(default_factory=dict)


class ProcessHandle(Protocol):
    """A started router or worker."""

    name: str

    def poll(self) -> int | None:
        """``None`` while running, else the exit code (negative: killed by that signal)."""
        ...

    def terminate(self) -> None:
        """Ask for a graceful stop (SIGTERM: a worker drains first)."""
        ...

    def kill(self) -> None:
        """Stop now (SIGKILL)."""
        ...

    def placement(self) -> Placement:
        """Where it runs."""
        ...


class WaitableHandle(ProcessHandle, Protocol):
    """A handle whose process can be waited for (real processes; not the simulator's)."""

    def wait(self, timeout_s: float) -> int | None:
        """Wait up to ``timeout_s`` for it to end: its exit code, or None if it still runs."""
        ...


class RouterHandle(ProcessHandle, Protocol):
    """A started router, with the addresses it bound."""

    url: str  # base URL of the OpenAI API, e.g. http://127.0.0.1:8000
    control_endpoint: str  # where workers register, e.g. tcp://10.0.0.5:5557


class Backend(Protocol):
    """Starts processes somewhere; see the module docstring for the contract."""

    def start_router(self, args: list[str], env: dict[str, str]) -> RouterHandle:
        """Start ``pdserve router`` with ``args``; return once its ports are bound."""
        ...

    def start_worker(self, spec: WorkerSpec) -> ProcessHandle:
        """Start ``pdserve worker`` as ``spec`` says; return without waiting for it to load."""
        ...

    def close(self) -> None:
        """Stop everything still running and free what the backend holds."""
        ...


def stop_all(handles: Sequence[WaitableHandle], grace_s: float, kill_wait_s: float = 10.0) -> None:
    """Stop every handle: SIGTERM all (the last started first), SIGKILL what outlives ``grace_s``.

    Started order puts the router first, so workers get their SIGTERM before it
    and drain while it still routes. Every process stops in parallel: the waits
    share one deadline, and the ones still running at it are all killed before
    any is waited for again (a stop takes at most ``grace_s + kill_wait_s``,
    however many processes hang). ``poll()`` at the end lets a handle free what
    its process left behind.
    """
    for handle in reversed(handles):
        handle.terminate()
    deadline = time.monotonic() + grace_s
    late = [h for h in handles if h.wait(max(deadline - time.monotonic(), 0.0)) is None]
    for handle in late:
        logger.warning("%s did not stop in %.0f s; killing it", handle.name, grace_s)
        handle.kill()
    kill_deadline = time.monotonic() + kill_wait_s
    for handle in late:
        if handle.wait(max(kill_deadline - time.monotonic(), 0.0)) is None:
            logger.error("%s still runs %.0f s after it was killed", handle.name, kill_wait_s)
    for handle in handles:
        handle.poll()
