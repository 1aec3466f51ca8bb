"""How a worker process runs: its engine, its router, its KV channel, its timeouts."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.config import EngineConfig, Role


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker runs and reaches the router.

    Attributes:
        engine: model, cache and scheduler settings (the role is ``engine.scheduler.role``).
        router: the router's control endpoint, ``tcp://HOST:PORT``.
        worker_id: unique name; default ``ROLE-HOSTNAME-PID``.
        kv_host: address the KV receiver binds to (decode and mixed roles); loopback by default.
        kv_advertise_host: address prefill workers dial when ``kv_host`` is all interfaces
            (``0.0.0.0``); None: the host name.
        kv_transport: force ``shm`` or ``tcp`` instead of choosing per peer.
        heartbeat_interval_s: seconds between heartbeats.
        kv_lease_s: a prefill (or mixed) worker frees KV held for a hand-off after this long
            without the decode side's acknowledgement (it is gone or stuck).
        drain_timeout_s: on SIGTERM, how long to keep serving accepted requests.
        metrics_port: serve Prometheus metrics on this port of 127.0.0.1 (0: any free
            port, announced at registration; None: off).
        inject_fault: testing only; ``drop-kv-done`` makes a prefill worker never
            complete a KV hand-off (the router's KV deadline must catch it).
        secret: cluster secret presented at registration.
    """

    engine: EngineConfig
    router: str
    worker_id: str = ""
    kv_host: str = "127.0.0.1"
    kv_advertise_host: str | None = None
    kv_transport: str | None = None
    heartbeat_interval_s: float = 0.5
    kv_lease_s: float = 30.0
    drain_timeout_s: float = 30.0
    inject_fault: str | None = None
    metrics_port: int | None = None
    secret: str = field(default="", repr=False)

    @property
    def role(self) -> Role:
        """The engine's role."""
        return self.engine.scheduler.role
