"""The ``local`` launcher: router and workers as child processes on this host.

Lifecycle:

1. Start the router (``pdserve router ...``) on the HTTP port asked for (0:
   any) and any free control port; it binds them itself and reports what it
   got in a ready file (no port is picked before it is bound, so none can be
   taken in between). Then start each worker (``pdserve worker --role ...
   --router tcp://...``): the same commands a user would run by hand on other
   hosts, so ``ps`` shows every role.
2. Wait until the router's ``/ready`` answers 200 (or a child dies, or time
   runs out).
3. Run until SIGINT/SIGTERM or until a child exits; then stop every child
   (SIGTERM, then SIGKILL after a grace period). Children also get SIGTERM
   from the kernel if the launcher itself dies (``PR_SET_PDEATHSIG``), so no
   process is orphaned.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx

from pdserve.launch.base import stop_all
from pdserve.launch.local_backend import LocalProcess, die_with_parent

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchConfig:
    """A local deployment.

    Attributes:
        mode: ``disaggregated`` (prefill + decode workers) or ``aggregated`` (mixed workers).
        num_prefill, num_decode: worker counts in disaggregated mode.
        num_mixed: worker count in aggregated mode.
        host, port: the HTTP API (port 0 picks a free one).
        router_args: extra ``pdserve router`` arguments.
        worker_args: extra ``pdserve worker`` arguments (engine options, transport...).
        threads_per_worker: torch threads of each worker; 0 shares the cores out evenly.
        ready_timeout_s: how long to wait for ``/ready``.
        log_level: log level of every child.
    """

    mode: str = "disaggregated"
    num_prefill: int = 1
    num_decode: int = 1
    num_mixed: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    router_args: list[str] = field(default_factory=list)
    worker_args: list[str] = field(default_factory=list)
    threads_per_worker: int = 0
    ready_timeout_s: float = 120.0
    log_level: str = "WARNING"

    def __post_init__(self) -> None:
        if self.mode not in ("disaggregated", "aggregated"):
            raise ValueError(f"mode={self.mode!r}: use disaggregated or aggregated")
        counts = (self.num_prefill, self.num_decode) if self.mode == "disaggregated" else (self.num_mixed,)
        if min(counts) < 1:
            raise ValueError(f"{self.mode} mode needs at least one worker of each kind, got {counts}")


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral TCP port that is free right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalLauncher:
    """Starts, watches and stops one local deployment."""

    def __init__(self, config: LaunchConfig) -> None:
        self.config = config
        # Both known once the router has bound them (port 0: it picks; see ``start``).
        self.port = config.port
        self.control_port = 0
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._rundir = tempfile.TemporaryDirectory(prefix="pdserve-launch-")
        # Only processes started with this secret can register as workers.
        self.secret = os.environ.get("PDSERVE_CLUSTER_SECRET") or secrets.token_hex(16)

    @property
    def url(self) -> str:
        """Base URL of the OpenAI API."""
        return f"http://{self.config.host}:{self.port}"

    def _spawn(self, name: str, args: list[str], threads: int | None = None) -> None:
        env = dict(os.environ, PDSERVE_CLUSTER_SECRET=self.secret)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        cmd = [sys.executable, "-m", "pdserve", "--log-level", self.config.log_level, *args]
        logger.info("starting %s: %s", name, " ".join(cmd))
        proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent)
        self.procs.append((name, proc))

    def start(self) -> None:
        """Start router and workers; return once the router is ready."""
        c = self.config
        ready_file = os.path.join(self._rundir.name, "router.json")
        self._spawn(
            "router",
            [
                "router",
                "--host",
                c.host,
                "--port",
                str(self.port),
                "--control-port",
                "0",
                "--ready-file",
                ready_file,
                *c.router_args,
            ],
        )
        control_endpoint = self._wait_router(ready_file)
        roles = (
            [("prefill", c.num_prefill), ("decode", c.num_decode)]
            if c.mode == "disaggregated"
            else [("mixed", c.num_mixed)]
        )
        num_workers = sum(n for _, n in roles)
        threads = c.threads_per_worker or max((os.cpu_count() or 1) // num_workers, 1)
        for role, count in roles:
            for i in range(count):
                self._spawn(
                    f"{role}-{i}",
                    [
                        "worker",
                        "--role",
                        role,
                        "--router",
                        control_endpoint,
                        "--worker-id",
                        f"{role}-{i}",
                        "--threads",
                        str(threads),
                        "--metrics-port",
                        "0",
                        *c.worker_args,
                    ],
                    threads,
                )
        self._wait_ready()

    def _wait_router(self, ready_file: str) -> str:
        """Wait for the router to report the ports it bound; returns its control endpoint."""
        deadline = time.monotonic() + self.config.ready_timeout_s
        _, router = self.procs[0]
        while not os.path.exists(ready_file):
            if router.poll() is not None:
                raise RuntimeError(f"router exited with code {router.returncode} during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the router did not listen within {self.config.ready_timeout_s:.0f} s")
            time.sleep(0.05)
        with open(ready_file) as f:
            ready = json.load(f)
        self.port = int(ready["http_port"])
        endpoint = str(ready["control_endpoint"])
        self.control_port = int(endpoint.rsplit(":", 1)[1])
        return endpoint

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.ready_timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {proc.returncode} during start-up")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1.0).status_code == 200 and self._all_registered():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the deployment was not ready within {self.config.ready_timeout_s:.0f} s")

    def metrics_ports(self) -> dict[str, int]:
        """Where each registered worker serves its /metrics (as it told the router)."""
        workers = httpx.get(f"{self.url}/pdserve/workers?stats=false", headers=self._headers(), timeout=5.0)
        return {w["worker_id"]: w["metrics_port"] for w in workers.json()["workers"]}

    def _headers(self) -> dict[str, str]:
        key = os.environ.get("PDSERVE_API_KEY", "").split(",")[0].strip()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _all_registered(self) -> bool:
        """Every worker we started is in the router's registry (ready needs only one pair)."""
        reply = httpx.get(f"{self.url}/pdserve/workers?stats=false", headers=self._headers(), timeout=5.0)
        workers = reply.json()["workers"]
        return len(workers) >= len(self.procs) - 1

    def wait(self) -> int:
        """Block until a signal arrives or a child exits; returns an exit code."""
        stop = {"signal": 0}

        def on_signal(signum: int, _frame: object) -> None:
            stop["signal"] = signum

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stop["signal"]:
                for name, proc in self.procs:
                    if proc.poll() is not None:
                        logger.error("%s exited with code %s; stopping the deployment", name, proc.returncode)
                        return 1
                time.sleep(0.2)
            return 0
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop every child: workers first, then the router; SIGKILL what lingers (see ``stop_all``)."""
        stop_all([LocalProcess(name, proc) for name, proc in self.procs], grace_s)
        self._rundir.cleanup()
