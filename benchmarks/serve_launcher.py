"""A deployment started as users start it (``pdserve serve``), for the scenarios that compare it with
:class:`~pdserve.launch.local.LocalLauncher` deployments (S3's planner configuration).

It offers what the benchmark drivers use of a ``LocalLauncher``: ``start``, ``stop``, ``url`` and
``procs`` (the ``pdserve serve`` process first, then its router and workers as they are now, so a
:class:`cpu_meter.CpuMeter` made at the start of a window meters the processes serving it).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from pdserve.launch.local import free_port


@dataclass(frozen=True)
class Child:
    """A process of the deployment the supervisor owns (restarts are its business, not ours)."""

    pid: int
    returncode: int | None = None

    def poll(self) -> int | None:
        return None


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from ``/proc``)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            kids = []
        found += kids
        todo += kids
    return found


class ServeLauncher:
    """``pdserve serve`` with the given arguments on a free port, its output in ``log``."""

    def __init__(self, serve_args: list[str], log: Path, ready_timeout_s: float = 600.0) -> None:
        self.serve_args = serve_args
        self.log = log
        self.ready_timeout_s = ready_timeout_s
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "pdserve", "serve", "--port", str(self.port), *self.serve_args]

    @property
    def procs(self) -> list[tuple[str, subprocess.Popen[bytes] | Child]]:
        if self.proc is None:
            return []
        kids: list[tuple[str, subprocess.Popen[bytes] | Child]] = [
            (f"child-{pid}", Child(pid)) for pid in children(self.proc.pid)
        ]
        return [("serve", self.proc), *kids]

    def start(self) -> None:
        """Start it; returns once ``/v1/models`` answers 200 (raises if it exits or times out)."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.command, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pdserve serve exited: {self.log.read_text()[-1500:]}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"pdserve serve not ready in {self.ready_timeout_s:g} s")

    def stop(self) -> None:
        """SIGTERM (it drains and stops its workers); wait for it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
