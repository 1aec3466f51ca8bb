"""The ``ray`` backend: the router and every worker as Ray actors on a Ray cluster.

One actor (:class:`ProcessHost`) per component. It runs the same ``pdserve
router`` / ``pdserve worker`` command as the local backend, as a child process
in the actor's process group, so a killed actor (or a lost node) takes its
process with it, and nothing outlives the deployment. Ray places the actors:
a role's resources (``--prefill-resources '{"prefill_node": 1}'``, see
:mod:`pdserve.launch.ray_resources`) become the actor's resource request.

Lifecycle of one component:

1. ``start_*`` creates the actor with the role's resources and calls its
   ``run`` method, which starts the process and returns only when it ends
   (with its exit code); Ray keeps that call pending meanwhile.
2. Before starting the process the actor makes it reachable from other nodes:
   the router's control socket and a worker's KV receiver bind ``0.0.0.0`` and
   advertise the node's IP (``ray.util.get_node_ip_address()``); registration
   and KV messages stay authenticated by the cluster secret and per-receiver
   tokens. ``PDSERVE_HOST_ID`` is set to the Ray node id, so two workers on
   one Ray node pair over ``shm`` and workers on different nodes over ``tcp``
   (simulated nodes share one machine and one IP).
3. ``poll`` looks at the pending ``run`` call without blocking: its exit code,
   or ``-9`` when the actor died (killed, or its node lost). An ended
   component's actor is killed so its resources are free for a replacement.
4. ``terminate`` sends SIGTERM to the process through its actor (the worker
   drains); an actor Ray has not placed yet is just removed. ``kill`` sends
   SIGKILL and kills the actor.
5. ``close`` terminates everything, kills what is left after a grace period,
   and disconnects from Ray if it connected.

The router's actor goes where ``--router-resources`` says; without them it is
pinned to the Ray node ``pdserve serve`` runs on (a soft pin was seen to
place it elsewhere half the time), so the printed URL is reachable there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from pdserve.errors import ConfigError, PDServeError
from pdserve.launch.base import Placement, WorkerSpec, stop_all
from pdserve.launch.ray_resources import actor_options, check_feasible

try:
    import ray
    from ray.exceptions import RayActorError, RayError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError as _exc:  # pragma: no cover - the message is the point
    raise PDServeError(
        "--launcher ray needs Ray, an optional dependency: pip install -e '.[ray]' "
        "(from a checkout) or pip install 'pdserve[ray]'"
    ) from _exc

logger = logging.getLogger(__name__)

HOST_ID_ENV = "PDSERVE_HOST_ID"  # read by pdserve.transfer.base.host_id
ACTOR_DIED = -signal.SIGKILL  # exit code reported when the actor (or its node) is gone
WAITING_NOTICE_S = 30.0  # an actor not placed after this long is logged (once)


def _die_with_actor() -> None:
    """In the child: SIGKILL from the kernel when the actor process dies (Linux), as its node would.

    Also unblocks every signal: the actor's threads run with SIGINT blocked, and a
    blocked mask survives ``exec`` (the process would never see Ctrl-C's signal).
    """
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _unlink_dead_segments(pid: int = 0) -> None:
    """Unlink the KV segments ``pid`` (ended) and any dead process left in this node's /dev/shm.

    A decode worker killed with its actor (``ray.kill``, a lost node) cannot
    unlink its segment, and no one else on the node is its parent: every actor
    sweeps when its process starts and ends.
    """
    from pdserve.launch.local_backend import unlink_segments_of
    from pdserve.transfer.shm import unlink_stale_segments

    if pid:
        unlink_segments_of(pid)
    for name in unlink_stale_segments():
        logger.info("unlinked %s (its process is gone)", name)


class ProcessHost:
    """Ray actor hosting one ``pdserve router`` or ``pdserve worker`` process.

    Created with ``max_concurrency`` > 1: ``run`` blocks for the process's
    whole life while ``placement``, ``ready`` and ``signal`` answer.
    """

    def __init__(self, log_level: str) -> None:
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = threading.Event()
        self._lock = threading.Lock()
        self._stopped = False  # a stop asked for before the process started: it never starts
        self.node_ip = ray.util.get_node_ip_address()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.rundir = tempfile.mkdtemp(prefix="pdserve-ray-")
        self.ready_file = os.path.join(self.rundir, "router.json")

    def run(self, command: str, args: list[str], env: dict[str, str]) -> int:
        """Start ``pdserve COMMAND ARGS`` reachable from other nodes; return its exit code when it ends."""
        if command == "router":
            args = [*args, "--control-host", "0.0.0.0", "--ready-file", self.ready_file]
        else:
            args = [*args, "--kv-host", "0.0.0.0", "--kv-advertise-host", self.node_ip]
        child_env = dict(os.environ, **env)
        child_env[HOST_ID_ENV] = f"ray-node-{self.node_id}"
        cmd = [sys.executable, "-m", "pdserve", "--log-level", self.log_level, command, *args]
        _unlink_dead_segments()
        with self._lock:
            try:
                if self._stopped:
                    return 0
                self.proc = subprocess.Popen(cmd, env=child_env, preexec_fn=_die_with_actor)
            finally:
                self.started.set()
        code = self.proc.wait()
        _unlink_dead_segments(self.proc.pid)
        shutil.rmtree(self.rundir, ignore_errors=True)
        return code

    def placement(self) -> tuple[str, str, int]:
        """(node IP, Ray node id, pid of the process) once it started."""
        self.started.wait()
        return self.node_ip, self.node_id, self.proc.pid if self.proc is not None else 0

    def ready(self, timeout_s: float) -> dict[str, Any]:
        """The router's ports, once it bound them; its control endpoint names this node's IP."""
        deadline = time.monotonic() + timeout_s
        self.started.wait(timeout_s)
        while not os.path.exists(self.ready_file):
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"router exited with code {code} during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the router did not listen within {timeout_s:.0f} s")
            time.sleep(0.05)
        with open(self.ready_file) as f:
            ready: dict[str, Any] = json.load(f)
        port = str(ready["control_endpoint"]).rsplit(":", 1)[1]
        host = f"[{self.node_ip}]" if ":" in self.node_ip else self.node_ip  # IPv6
        ready["control_endpoint"] = f"tcp://{host}:{port}"
        ready["node_ip"] = self.node_ip
        return ready

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process; before it started, it will not start at all."""
        with self._lock:
            if self.proc is None:
                self._stopped = True
            elif self.proc.poll() is None:
                self.proc.send_signal(signum)


_RemoteHost = ray.remote(ProcessHost)


class RayProcess:
    """A component running in a :class:`ProcessHost` actor (a ``ProcessHandle``)."""

    def __init__(
        self, name: str, actor: Any, run_ref: Any, resources: dict[str, float] | None = None
    ) -> None:
        self.name = name
        self.actor = actor
        self.resources = resources or {}
        self._run_ref = run_ref
        self._placement_ref = actor.placement.remote()
        self._placement: Placement | None = None
        self._code: int | None = None
        self._killed = False  # by us: its actor's death is no news
        self._created_s = time.monotonic()
        self._told_waiting = False

    def poll(self) -> int | None:
        """``None`` while it runs (or waits for a node), else its exit code (-9: the actor died)."""
        if self._code is not None:
            return self._code
        done, _ = ray.wait([self._run_ref], timeout=0)
        if not done:
            if not self._told_waiting and time.monotonic() - self._created_s > WAITING_NOTICE_S \
                    and not self.placement().pid:
                self._told_waiting = True
                logger.warning("%s has waited %.0f s for a Ray node with room for %s; it starts once one "
                               "has (a node joins or another actor ends)", self.name, WAITING_NOTICE_S,
                               json.dumps(self.resources) if self.resources else "it")
            return None
        try:
            self._code = int(ray.get(self._run_ref))
        except RayActorError as exc:
            why = [line.strip() for line in str(exc).splitlines() if line.strip()][-1:]
            logger.log(logging.INFO if self._killed else logging.WARNING, "%s: its Ray actor is gone (%s)",
                       self.name, why[0] if why else type(exc).__name__)
            self._code = ACTOR_DIED
        except RayError as exc:
            logger.error("%s could not run on Ray: %s", self.name, exc)
            self._code = 1
        ray.kill(self.actor, no_restart=True)  # free its resources for a replacement
        return self._code

    def terminate(self) -> None:
        """SIGTERM to the process (a worker drains first); an actor still waiting for a node is removed."""
        if self.poll() is None:
            if self.placement().pid:
                self.actor.signal.remote(signal.SIGTERM)
            else:  # not placed yet (or not started): nothing to drain
                self._killed = True
                ray.kill(self.actor, no_restart=True)

    def kill(self) -> None:
        """SIGKILL the process and kill its actor now."""
        if self.poll() is None:
            if self.placement().pid:
                with contextlib.suppress(RayError, TimeoutError):  # gone or stuck: ray.kill takes it along
                    ray.get(self.actor.signal.remote(signal.SIGKILL), timeout=5.0)
            self._killed = True
            ray.kill(self.actor, no_restart=True)

    def wait(self, timeout_s: float) -> int | None:
        """Wait up to ``timeout_s`` for it to end; its exit code, or None if it still runs."""
        ray.wait([self._run_ref], timeout=max(timeout_s, 0.0))
        return self.poll()

    def placement(self) -> Placement:
        """Node IP, Ray node id and pid; empty until Ray has placed the actor and it started."""
        if self._placement is None:
            done, _ = ray.wait([self._placement_ref], timeout=0)
            if not done:
                return Placement(host="")
            try:
                host, node_id, pid = ray.get(self._placement_ref)
            except RayError:
                return Placement(host="")
            self._placement = Placement(host=host, node_id=node_id, pid=pid)
        return self._placement


class RayRouter(RayProcess):
    """The router's component, with the addresses it bound."""

    def __init__(self, name: str, actor: Any, run_ref: Any, url: str, control_endpoint: str) -> None:
        super().__init__(name, actor, run_ref)
        self.url = url
        self.control_endpoint = control_endpoint


class RayBackend:
    """Router and workers as Ray actors (a :class:`~pdserve.launch.base.Backend`).

    Args:
        address: the cluster (``auto``: the one this node belongs to; ``HOST:PORT``;
            None: ``RAY_ADDRESS`` or a new single-node Ray instance).
        role_resources: each role's resources (``prefill``, ``decode``, ``mixed``, ``router``;
            a ``WorkerSpec``'s own resources override its role's).
        log_level: log level of every process.
        start_timeout_s: how long ``start_router`` waits for the router to bind.
        stop_timeout_s: how long ``close`` lets processes drain before it kills them.
    """

    def __init__(
        self,
        address: str | None = None,
        role_resources: dict[str, dict[str, float]] | None = None,
        log_level: str = "WARNING",
        start_timeout_s: float = 120.0,
        stop_timeout_s: float = 20.0,
    ) -> None:
        self.role_resources = dict(role_resources or {})
        self.log_level = log_level
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._owns_connection = not ray.is_initialized()
        if self._owns_connection:
            _check_reachable(address)
            try:
                ray.init(address=address, namespace="pdserve", log_to_driver=True,
                         configure_logging=False)
            except ConnectionError as exc:
                raise ConfigError(f"--ray-address {address}: no Ray cluster there ({exc}); start one "
                                  "with `ray start --head` or name its address") from exc
        self._processes: list[RayProcess] = []
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        try:
            for role, resources in self.role_resources.items():
                check_feasible(role, resources, nodes)
        except ConfigError:
            if self._owns_connection:
                ray.shutdown()
            raise

    def _create(self, resources: dict[str, float], **extra: Any) -> Any:
        options = {**actor_options(resources), **extra}
        return _RemoteHost.options(max_concurrency=4, max_restarts=0, **options).remote(self.log_level)

    def start_router(self, args: list[str], env: dict[str, str]) -> RayRouter:
        """Start ``pdserve router ARGS``; return once it bound its ports.

        It goes where the ``router`` resources say, else on this process's Ray node.
        """
        if self.role_resources.get("router"):
            actor = self._create(self.role_resources["router"])
        else:
            here = ray.get_runtime_context().get_node_id()
            actor = self._create({}, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))
        run_ref = actor.run.remote("router", list(args), dict(env))
        try:
            ready = ray.get(actor.ready.remote(self.start_timeout_s), timeout=self.start_timeout_s + 30)
        except (RayError, TimeoutError) as exc:
            ray.kill(actor, no_restart=True)
            cause = exc.cause if isinstance(exc, RayError) and hasattr(exc, "cause") else exc
            raise RuntimeError(f"the router did not start on Ray: {cause}") from exc
        host = _arg(args, "--host", "127.0.0.1")
        if host in ("0.0.0.0", "::", ""):
            host = ready["node_ip"]
        router = RayRouter("router", actor, run_ref, f"http://{host}:{ready['http_port']}",
                           ready["control_endpoint"])
        self._processes.append(router)
        return router

    def start_worker(self, spec: WorkerSpec) -> RayProcess:
        """Create the worker's actor with its role's resources; returns before Ray has placed it.

        A role that reserves CPUs (``num_cpus`` ≥ 1) gets that many torch threads,
        whatever ``spec.threads`` (reckoned from this machine's cores) says.
        """
        resources = spec.resources or self.role_resources.get(spec.role, {})
        actor = self._create(resources)
        env, args = dict(spec.env), list(spec.args)
        threads = int(resources.get("num_cpus", 0)) or spec.threads
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
            args += ["--threads", str(threads)]  # the last --threads wins
        process = RayProcess(spec.worker_id, actor, actor.run.remote("worker", args, env), resources)
        self._processes = [p for p in self._processes if p._code is None]
        self._processes.append(process)
        return process

    def close(self, grace_s: float | None = None) -> None:
        """SIGTERM every process (workers first), kill the actors of what outlives ``grace_s``.

        ``grace_s`` defaults to ``stop_timeout_s``.
        """
        grace_s = self.stop_timeout_s if grace_s is None else grace_s
        stop_all(self._processes, grace_s, kill_wait_s=5.0)  # kill() ends the actor
        self._processes = []
        if self._owns_connection and ray.is_initialized():
            ray.shutdown()


def _check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """Raise ConfigError unless something listens at ``HOST:PORT`` (Ray would retry for minutes)."""
    if not address or address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--ray-address {address}: no Ray cluster answers there ({exc}); give the "
                          "head node's GCS address (HOST:6379 by default) or auto") from exc


def _arg(args: list[str], name: str, default: str) -> str:
    """The value of option ``name`` in an argument list (its last occurrence)."""
    value = default
    for i, a in enumerate(args[:-1]):
        if a == name:
            value = args[i + 1]
    return value
