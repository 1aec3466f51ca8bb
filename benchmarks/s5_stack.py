"""S5's processes: the fake OpenAI server, a real ``pdserve router`` and the fake worker.

:class:`Stack` starts the three once for the whole run, waits until the router is ready,
reads each process's CPU time from ``/proc`` and stops them at the end.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from s5_fake_worker import MODEL


def free_port() -> int:
    """A TCP port free on 127.0.0.1 just now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """The fake server, the router and the fake worker, started once for the whole run."""

    def __init__(self, router_args: list[str]) -> None:
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.logs = tempfile.TemporaryDirectory(prefix="s5-")
        here = Path(__file__).resolve().with_name("s5_router_overhead.py")  # its fake-worker mode
        server = [sys.executable, "-m", "pdserve.bench.fake_server", "--port", "0", "--model", MODEL]
        fake = self._start("fake_server", server, stdout=subprocess.PIPE)
        assert fake.stdout is not None
        self.direct_url = fake.stdout.readline().strip().rsplit(" ", 1)[-1]
        port, control = free_port(), free_port()
        router = [sys.executable, "-m", "pdserve", "router", "--model", MODEL, *router_args]
        self._start("router", [*router, "--port", str(port), "--control-port", str(control)])
        self.router_url = f"http://127.0.0.1:{port}"
        self.trace_path = Path(self.logs.name) / "worker.trace"
        self.trace_path.write_text("")
        worker = [sys.executable, str(here), "fake-worker", "--router", f"tcp://127.0.0.1:{control}"]
        self._start("worker", [*worker, "--trace", str(self.trace_path)])
        self._wait_ready()

    def _start(self, name: str, cmd: list[str], stdout: Any = None) -> subprocess.Popen[str]:
        err = open(Path(self.logs.name) / f"{name}.log", "w")  # noqa: SIM115 (kept open for the process)
        proc = subprocess.Popen(cmd, stdout=stdout or err, stderr=err, text=True)
        self.procs[name] = proc
        return proc

    def _wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited: {self.log(name)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.router_url + "/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"router not ready after {timeout_s} s: {self.log('router')}")

    def log(self, name: str) -> str:
        """The end of a process's log."""
        return (Path(self.logs.name) / f"{name}.log").read_text()[-2000:]

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds used so far by each process and by this one."""
        tick = os.sysconf("SC_CLK_TCK")
        out = {}
        for name, proc in [*self.procs.items(), ("client", None)]:
            pid = proc.pid if proc is not None else os.getpid()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        return out

    def close(self) -> None:
        """Stop every process (terminate, then kill after 10 s) and remove the logs."""
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.logs.cleanup()
