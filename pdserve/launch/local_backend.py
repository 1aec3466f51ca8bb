"""The supervisor's ``local`` backend: router and workers as child processes of this one.

:class:`LocalBackend` is the :class:`~pdserve.launch.base.Backend` that ``pdserve serve
--launcher local`` gives the :class:`~pdserve.launch.supervisor.Supervisor`:

1. ``start_router`` runs ``pdserve router ... --ready-file F`` and returns once the router
   reported in F the ports it bound; ``start_worker`` runs ``pdserve worker ...`` at once.
2. Each child is a :class:`LocalProcess` handle (``poll``, ``terminate``, ``kill``,
   ``placement``); once it is seen to have ended, the shared-memory KV segments it left
   are unlinked (:func:`unlink_segments_of`: a SIGKILLed decode worker cannot do it).
3. ``close`` stops every child (workers first). Children also get SIGTERM from the kernel
   if this process dies (:func:`die_with_parent`, ``PR_SET_PDEATHSIG``). Each child runs in
   a process group of its own, so a terminal's Ctrl-C signals only this process.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from pdserve.launch.base import Placement, WorkerSpec, stop_all

logger = logging.getLogger(__name__)
# the readiness polls (LocalLauncher, pdserve.launch.local) and the supervisor's syncs are not news
logging.getLogger("httpx").setLevel(logging.WARNING)


def die_with_parent() -> None:
    """In the child: get SIGTERM when the launcher dies (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:
        pass


#: ``pdserve.transfer.shm.SEGMENT_PREFIX``, without importing it (that imports torch: seconds
#: in the launcher, which would delay the restart of the worker that died).
SEGMENT_PREFIX = "pdserve-kv-"


def unlink_segments_of(pid: int) -> list[str]:
    """Unlink the shared-memory KV segments a (dead) process created; returns their names.

    A decode worker killed by SIGKILL cannot unlink its own segment; its name
    carries its pid (``pdserve-kv-<pid>-<hex>``, see :mod:`pdserve.transfer.shm`).
    """
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return []
    removed = []
    for name in names:
        if name.startswith(f"{SEGMENT_PREFIX}{pid}-"):
            # Not shm.unlink_segment: its resource-tracker bookkeeping would start a tracker
            # process here (seconds on a busy host) for a segment this process never created.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join("/dev/shm", name))
                removed.append(name)
    return removed


class LocalProcess:
    """A child process started by :class:`LocalBackend` (a :class:`~pdserve.launch.base.ProcessHandle`).

    When it is seen to have ended, what it left in ``/dev/shm`` is unlinked
    (a SIGKILLed decode worker cannot do it itself).
    """

    def __init__(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        self.name = name
        self.proc = proc
        self._cleaned = False

    def poll(self) -> int | None:
        """``None`` while running, else its exit code (negative: the signal that killed it)."""
        code = self.proc.poll()
        if code is not None and not self._cleaned:
            self._cleaned = True
            for segment in unlink_segments_of(self.proc.pid):
                logger.info("%s left shared-memory segment %s; unlinked", self.name, segment)
        return code

    def terminate(self) -> None:
        """SIGTERM (a worker drains, the router finishes its streams)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL."""
        if self.proc.poll() is None:
            self.proc.kill()

    def wait(self, timeout_s: float) -> int | None:
        """Wait up to ``timeout_s`` for it to end; its exit code, or None if it still runs."""
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None
        return self.poll()

    def placement(self) -> Placement:
        """This host and the child's pid."""
        return Placement(host=socket.gethostname(), pid=self.proc.pid)


class LocalRouter(LocalProcess):
    """The router child, with the addresses it bound."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], url: str, control_endpoint: str) -> None:
        super().__init__(name, proc)
        self.url = url
        self.control_endpoint = control_endpoint


class LocalBackend:
    """Router and workers as child processes of this one (a :class:`~pdserve.launch.base.Backend`).

    Args:
        log_level: log level of every child.
        start_timeout_s: how long ``start_router`` waits for the router to bind its ports.
        stop_timeout_s: how long ``close`` lets children drain before it kills them.

    Children get SIGTERM from the kernel if this process dies (``PR_SET_PDEATHSIG``).
    """

    def __init__(self, log_level: str = "WARNING", start_timeout_s: float = 120.0,
                 stop_timeout_s: float = 10.0) -> None:
        self.log_level = log_level
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._rundir = tempfile.TemporaryDirectory(prefix="pdserve-launch-")
        self._children: list[LocalProcess] = []
        self._num_routers = 0

    def _spawn(
        self, name: str, args: list[str], env: dict[str, str], threads: int = 0
    ) -> subprocess.Popen[bytes]:
        child_env = dict(os.environ, **env)
        if threads:
            child_env["OMP_NUM_THREADS"] = str(threads)
        cmd = [sys.executable, "-m", "pdserve", "--log-level", self.log_level, *args]
        logger.info("starting %s: %s", name, " ".join(cmd))
        # A process group of its own: Ctrl-C in a terminal reaches only the launcher, which then sends
        # each child one SIGTERM (a child that got the terminal's SIGINT as well would take that
        # SIGTERM for a second signal and stop without draining).
        return subprocess.Popen(cmd, env=child_env, preexec_fn=die_with_parent, process_group=0)

    def start_router(self, args: list[str], env: dict[str, str]) -> LocalRouter:
        """Start ``pdserve router ARGS --ready-file F``; return once it reported its ports in F."""
        self._num_routers += 1
        ready_file = os.path.join(self._rundir.name, f"router-{self._num_routers}.json")
        proc = self._spawn("router", ["router", *args, "--ready-file", ready_file], env)
        deadline = time.monotonic() + self.start_timeout_s
        while not os.path.exists(ready_file):
            if proc.poll() is not None:
                raise RuntimeError(f"router exited with code {proc.returncode} during start-up")
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise TimeoutError(f"the router did not listen within {self.start_timeout_s:.0f} s")
            time.sleep(0.05)
        with open(ready_file) as f:
            ready = json.load(f)
        host = _arg(args, "--host", "127.0.0.1")
        url = f"http://{host}:{ready['http_port']}"
        router = LocalRouter("router", proc, url, str(ready["control_endpoint"]))
        self._children.append(router)
        return router

    def start_worker(self, spec: WorkerSpec) -> LocalProcess:
        """Start ``pdserve worker SPEC.ARGS`` with ``spec.threads`` torch threads; returns at once."""
        proc = self._spawn(spec.worker_id, ["worker", *spec.args], spec.env, spec.threads)
        child = LocalProcess(spec.worker_id, proc)
        self._children.append(child)
        self._children = [c for c in self._children if c.proc.returncode is None or c is child]
        return child

    def close(self, grace_s: float | None = None) -> None:
        """SIGTERM every child still running (workers first), SIGKILL what outlives ``grace_s``.

        ``grace_s`` defaults to ``stop_timeout_s``.
        """
        grace_s = self.stop_timeout_s if grace_s is None else grace_s
        stop_all(self._children, grace_s)  # poll() unlinks what each left behind
        self._children = []
        self._rundir.cleanup()


def _arg(args: list[str], name: str, default: str) -> str:
    """The value of option ``name`` in an argument list (its last occurrence)."""
    value = default
    for i, a in enumerate(args[:-1]):
        if a == name:
            value = args[i + 1]
    return value
