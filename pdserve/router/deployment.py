"""The router's side of a supervised deployment: target pool sizes, drains, role flips.

Who decides what (see ``docs/scaling.md``):

* The router keeps the *targets* (workers per pool, and optionally the torch
  threads of every worker). ``POST /pdserve/scale`` (``pdserve scale``)
  validates and sets them; nothing changes on a bad request (400) or when no
  supervisor runs the deployment (409).
* The supervisor (:mod:`pdserve.launch.supervisor`) polls the router with
  ``POST /pdserve/supervisor`` every fraction of a second, authenticated by
  the cluster secret. It sends its slots (each worker's state and where it
  runs) and the workers it wants drained, flipped or given another thread
  count; the router applies those at once (a drained worker gets no new
  request from this moment on; ``SetThreads`` goes to the worker) and answers
  with the targets and the registered workers' load and threads.
* ``GET /pdserve/workers`` shows both under ``deployment`` (docs/scaling.md
  has the JSON shape).

The router seeds its targets from the supervisor's first sync (the counts
``pdserve serve`` was started with), and again after a router restart.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import Any, TypeGuard

from fastapi import FastAPI, Request
from fastapi.responses import Response

from pdserve.config import Role
from pdserve.router.dispatcher import Dispatcher
from pdserve.router.errors import APIError
from pdserve.worker import protocol as p

logger = logging.getLogger(__name__)

POOLS = ("prefill", "decode", "mixed")
MAX_POOL_SIZE = 64
MAX_THREADS = 256
#: A supervisor that has not synced for this long no longer counts as running the deployment.
SUPERVISOR_STALE_S = 10.0


class Deployment:
    """Targets and the supervisor's last report; applies its drains and flips to the dispatcher."""

    def __init__(
        self, dispatcher: Dispatcher, secret: str = "", clock: Callable[[], float] = time.monotonic
    ) -> None:
        """``clock``: when syncs happen (the simulator's time in :mod:`pdserve.sim.elastic`)."""
        self.dispatcher = dispatcher
        self.clock = clock
        self.secret = secret
        self.targets: dict[str, int] | None = None
        self.threads_target: int | None = None  # None: as each worker was started
        self.generation = 0
        self.launcher = ""
        self.slots: list[dict[str, Any]] = []
        self.last_sync_s: float | None = None

    @property
    def supervised(self) -> bool:
        """A supervisor synced recently."""
        return self.last_sync_s is not None and self.clock() - self.last_sync_s < SUPERVISOR_STALE_S

    # -- supervisor sync -----------------------------------------------------------------

    def sync(self, body: dict[str, Any]) -> dict[str, Any]:
        """Apply one supervisor report (see the module docstring); returns the reply."""
        self.last_sync_s = self.clock()
        self.launcher = str(body.get("launcher", ""))
        self.slots = list(body.get("slots", []))
        if self.targets is None:
            self.targets = {r: int(body.get("targets", {}).get(r, 0)) for r in POOLS}
            threads = body.get("threads")
            self.threads_target = threads if _valid_threads(threads) else None
            self.generation += 1
        for wid in body.get("drain", []):
            self.drain(str(wid))
        for wid, role in dict(body.get("flip", {})).items():
            self.flip(str(wid), str(role))
        for wid, threads in dict(body.get("set_threads", {})).items():
            self.set_threads(str(wid), threads)
        return {
            "targets": self.targets,
            "threads": self.threads_target,
            "generation": self.generation,
            "workers": [
                {"worker_id": w.worker_id, "role": w.role.value, "pid": w.pid,
                 "num_inflight": w.num_inflight, "draining": w.draining, "threads": w.threads}
                for w in self.dispatcher.registry.all()
            ],
        }

    def drain(self, worker_id: str) -> None:
        """Route nothing new to the worker (its running requests finish)."""
        info = self.dispatcher.registry.get(worker_id)
        if info is not None and not info.draining:
            info.draining = True
            logger.info("router: draining %s (scale down)", worker_id)

    def flip(self, worker_id: str, role: str) -> None:
        """Drain the worker, then have it re-register as ``role`` (it keeps its weights)."""
        info = self.dispatcher.registry.get(worker_id)
        if info is None or role not in POOLS:
            return
        info.draining = True
        self.dispatcher.channel.send(worker_id, p.Flip(role))
        logger.info("router: %s flips %s -> %s", worker_id, info.role.value, role)

    def set_threads(self, worker_id: str, threads: object) -> None:
        """Have the worker compute with ``threads`` torch threads (its heartbeats then report them)."""
        if self.dispatcher.registry.get(worker_id) is None or not _valid_threads(threads):
            return
        self.dispatcher.channel.send(worker_id, p.SetThreads(threads))
        logger.info("router: %s to compute with %s threads", worker_id, threads)

    # -- scaling -----------------------------------------------------------------------------

    def scale(self, body: object) -> dict[str, Any]:
        """Validate and set new targets; raises :class:`APIError` (and changes nothing) on bad input.

        ``threads`` (optional, 1 to ``MAX_THREADS``) sets every worker's torch threads;
        without it the threads target stays as it was.
        """
        if not isinstance(body, dict) or not body:
            raise APIError(400, "the body must be a JSON object such as {\"prefill\": 2, \"decode\": 3}")
        body, threads = dict(body), self.threads_target
        if "threads" in body:
            threads = body.pop("threads")
            if not _valid_threads(threads):
                raise APIError(400, f"threads must be an integer from 1 to {MAX_THREADS}, got {threads!r}",
                               param="threads")
        for pool, count in body.items():
            if pool not in POOLS:
                raise APIError(400, f"unknown pool {pool!r}; pools are {', '.join(POOLS)}", param=pool)
            if isinstance(count, bool) or not isinstance(count, int):
                raise APIError(400, f"{pool} must be an integer, got {count!r}", param=pool)
            if not 0 <= count <= MAX_POOL_SIZE:
                raise APIError(400, f"{pool}={count} is out of range (0 to {MAX_POOL_SIZE})", param=pool)
        if not self.supervised or self.targets is None:
            raise APIError(409, "no supervisor runs this deployment (start it with `pdserve serve`); "
                                "nothing to scale", code="not_supervised")
        new = {**self.targets, **body}
        if new["mixed"] < 1 and (new["prefill"] < 1 or new["decode"] < 1):
            raise APIError(400, f"{new} leaves no complete serving path: keep a prefill and a decode "
                                "worker, or a mixed worker", code="no_serving_path")
        previous, self.targets = self.targets, new
        previous_threads, self.threads_target = self.threads_target, threads
        self.generation += 1
        logger.info("router: targets %s -> %s, threads %s -> %s", previous, new, previous_threads, threads)
        return {"targets": new, "previous": previous, "threads": threads,
                "previous_threads": previous_threads, "generation": self.generation}

    def changing(self) -> bool:
        """True while a supervised worker is flipping its role or starting (a reshape under way)."""
        return self.supervised and any(
            slot.get("state") in ("flipping", "starting") for slot in self.slots
        )

    # -- view ----------------------------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        """Per pool: target (None when unsupervised), actual (registered, not draining), slot states."""
        reg = self.dispatcher.registry
        pools: dict[str, Any] = {}
        for pool in POOLS:
            states: dict[str, int] = {}
            for slot in self.slots:
                if (slot.get("flip_to") or slot.get("role")) == pool:
                    states[slot["state"]] = states.get(slot["state"], 0) + 1
            pools[pool] = {
                "target": self.targets[pool] if self.targets is not None and self.supervised else None,
                "actual": len(reg.by_role(Role(pool))),
                "states": states,
            }
        return {
            "supervised": self.supervised,
            "launcher": self.launcher,
            "generation": self.generation,
            "pools": pools,
            "threads": self.threads_target if self.supervised else None,
            "workers": self.slots if self.supervised else [],
        }


def _valid_threads(value: object) -> TypeGuard[int]:
    """An int (not a bool) from 1 to ``MAX_THREADS``."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_THREADS


def add_deployment_routes(app: FastAPI, deployment: Deployment) -> None:
    """``POST /pdserve/scale`` (admin: the API key when one is set) and ``POST /pdserve/supervisor``."""

    async def json_body(request: Request) -> object:
        try:
            return json.loads(await request.body() or b"null")
        except ValueError:
            raise APIError(400, "the body is not valid JSON") from None

    @app.post("/pdserve/scale")
    async def scale(request: Request) -> Response:
        try:
            reply = deployment.scale(await json_body(request))
            return Response(json.dumps(reply), media_type="application/json")
        except APIError as exc:
            return exc.response()

    @app.post("/pdserve/supervisor")
    async def supervisor(request: Request) -> Response:
        given = request.headers.get("x-pdserve-cluster-secret", "")
        if deployment.secret and not hmac.compare_digest(given.encode(), deployment.secret.encode()):
            return APIError(403, "wrong cluster secret").response()
        body = await json_body(request)
        if not isinstance(body, dict):
            return APIError(400, "the body must be a JSON object").response()
        return Response(json.dumps(deployment.sync(body)), media_type="application/json")
