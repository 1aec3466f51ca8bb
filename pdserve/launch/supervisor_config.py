"""The configuration of the supervisor (:mod:`pdserve.launch.supervisor`): targets, restarts, syncing."""

from __future__ import annotations

from dataclasses import dataclass, field

#: The worker pools a deployment has, in the order they are reconciled.
ROLES = ("prefill", "decode", "mixed")


@dataclass
class SupervisorConfig:
    """How a deployment is supervised.

    Attributes:
        targets: initial worker count per role (``prefill``, ``decode``, ``mixed``).
        router_args: ``pdserve router`` arguments, without ``--port``/``--control-port``.
        port: HTTP port of the router's first start (0: any); restarts reuse the bound one.
        env: environment of every process (the cluster secret among it).
        secret: the cluster secret (authenticates the sync with the router).
        api_key: Bearer key for the router's admin routes, when it has keys.
        launcher: name shown in the deployment view (``local``, ``ray``).
        backoff_initial_s, backoff_max_s: restart delay, doubled per consecutive exit.
        crash_loop_exits, crash_loop_window_s: this many exits within the window mark the slot failed.
        max_start_failures: exits in a row before ever registering that mark it failed.
        sync_interval_s: seconds between passes of the loop.
        flip_timeout_s: a flip not finished by then is replaced by a restart in the new role.
        ready_timeout_s: how long :meth:`Supervisor.start` waits for the initial workers.
        allow_flips: shrink-one-grow-another by flipping roles (else stop + start).
    """

    targets: dict[str, int]
    router_args: list[str] = field(default_factory=list)
    port: int = 8000
    env: dict[str, str] = field(default_factory=dict)
    secret: str = ""
    api_key: str = ""
    launcher: str = "local"
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    crash_loop_exits: int = 5
    crash_loop_window_s: float = 60.0
    max_start_failures: int = 3
    sync_interval_s: float = 0.25
    flip_timeout_s: float = 120.0
    ready_timeout_s: float = 120.0
    allow_flips: bool = True
