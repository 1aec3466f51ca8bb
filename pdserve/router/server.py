"""The router process: OpenAI front end + dispatcher, served by uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import FrameType

import uvicorn
from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST

from pdserve.modelspec.arch import load_arch_config
from pdserve.router.app import create_app
from pdserve.router.dashboard import SLOConfig, mount_dashboard
from pdserve.router.deployment import Deployment, add_deployment_routes
from pdserve.router.dispatch_config import DispatcherConfig
from pdserve.router.dispatcher import Dispatcher
from pdserve.router.planner_board import PlannerBoard, add_planner_routes
from pdserve.router.tracing import Tracer
from pdserve.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterConfig:
    """Everything the router process needs.

    Attributes:
        model: preset name or checkpoint directory (for the tokenizer and limits).
        served_model_name: the ``model`` clients name; defaults to ``model``.
        host, port: where the HTTP API listens.
        control_port: where workers connect (0 picks a free port).
        control_host: interface of the control socket (loopback by default).
        max_model_len: context limit; defaults to the model's.
        dispatch: routing, leases, deadlines and recovery (its ``bind`` is
            replaced by ``control_host``/``control_port``).
        api_keys: accepted Bearer keys for the inference routes (empty: open).
        max_inflight: requests admitted at once; past it new ones get 429.
        drain_timeout_s: on SIGTERM, how long in-flight requests may finish.
        trace_responses: answers carry each generation's trace (``pdserve_trace``).
        trace_log: append every generation's trace to this JSON-lines file.
        event_loop: ``uvloop`` (libuv), ``asyncio`` (the standard loop) or
            ``auto`` (uvloop where installed).
        http: uvicorn's HTTP parser: ``httptools``, ``h11`` or ``auto``
            (httptools where installed).
        ready_file: once listening, write ``{"http_port", "control_endpoint"}``
            (JSON) here, so that whoever started the router with port 0 learns
            the ports it got (no port is picked before it is bound).
        slo_ttft_ms, slo_itl_ms: latency objectives the dashboard draws (None: none).
        startup_wait_s: until the first complete serving path registers, a generation
            request waits this long for it, then gets 503 (``--startup-wait``).
    """

    model: str = "tiny"
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    control_host: str = "127.0.0.1"
    control_port: int = 0
    max_model_len: int | None = None
    dispatch: DispatcherConfig = field(default_factory=DispatcherConfig)
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    max_inflight: int | None = 1024
    drain_timeout_s: float = 30.0
    trace_responses: bool = False
    trace_log: str | None = None
    event_loop: str = "auto"
    http: str = "auto"
    ready_file: str | None = None
    slo_ttft_ms: float | None = None
    slo_itl_ms: float | None = None
    startup_wait_s: float = 120.0


def build_router_app(config: RouterConfig) -> tuple[FastAPI, Dispatcher]:
    """The FastAPI app with its dispatcher (started and stopped by the app's lifespan)."""
    tokenizer = load_tokenizer(config.model)
    arch = load_arch_config(config.model)
    max_model_len = min(config.max_model_len or arch.max_position_embeddings, arch.max_position_embeddings)
    bind = f"tcp://{config.control_host}:{config.control_port}"
    dispatcher = Dispatcher(
        dataclasses.replace(config.dispatch, bind=bind), model_name=config.model, max_model_len=max_model_len
    )
    tracer = Tracer(
        dispatcher.metrics.registry, in_responses=config.trace_responses, log_path=config.trace_log,
        keep=1000,  # the SLO planner reads a window of them
    )
    app = create_app(
        dispatcher,
        tokenizer,
        served_model_name=config.served_model_name or config.model,
        api_keys=config.api_keys,
        max_inflight=config.max_inflight,
        tracer=tracer,
        registry=dispatcher.metrics.registry,
        startup_wait_s=config.startup_wait_s,
    )
    deployment = Deployment(dispatcher, secret=config.dispatch.secret)
    add_deployment_routes(app, deployment)
    app.state.gate.is_changing = deployment.changing
    add_planner_routes(app, PlannerBoard(app.state.admission, tracer), config.dispatch.secret,
                       dispatcher.metrics.registry)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await dispatcher.start()
        try:
            yield
        finally:
            await dispatcher.stop()
            tracer.close()

    app.router.lifespan_context = lifespan
    slo = SLOConfig(config.slo_ttft_ms, config.slo_itl_ms)
    mount_dashboard(app, dispatcher, tracer, slo, deployment.view)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text exposition of the router's metrics."""
        return Response(dispatcher.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/pdserve/traces")
    async def traces(limit: int = 50, inflight: bool = False) -> dict[str, object]:
        """The most recent ended generations' traces (at most ``limit``, newest last); with
        ``?inflight=true`` also those of the generations in flight (``inflight``, oldest first)."""
        limit = max(0, min(limit, 1000))
        reply: dict[str, object] = {"traces": tracer.recent(limit)}
        if inflight:
            reply["inflight"] = tracer.inflight(limit)
        return reply

    @app.get("/pdserve/workers")
    async def workers(stats: bool = True) -> dict[str, object]:
        """Registered workers and (unless ``?stats=false``) their counters, asked for now."""
        counters = {s.worker_id: s for s in await dispatcher.worker_stats()} if stats else {}
        return {
            "control_endpoint": dispatcher.endpoint,
            "num_inflight": dispatcher.num_inflight,
            "recovery": dataclasses.asdict(dispatcher.counters),
            "deployment": deployment.view(),
            "routing": dispatcher.placer.summary(),
            "workers": [
                {
                    "worker_id": w.worker_id,
                    "role": w.role.value,
                    "pid": w.pid,
                    "num_inflight": w.num_inflight,
                    "draining": w.draining,
                    "threads": w.threads,
                    "metrics_port": w.metrics_port,
                    "stats": _plain(counters.get(w.worker_id)),
                    "cache": dataclasses.asdict(dispatcher.placer.worker_view(w)),
                }
                for w in dispatcher.registry.all()
            ],
        }

    return app, dispatcher


def _plain(value: object) -> object:
    import msgspec

    return msgspec.to_builtins(value) if value is not None else None


class DrainingServer(uvicorn.Server):
    """uvicorn that drains first on SIGTERM/SIGINT.

    The first signal stops admission (new requests get 503, ``/ready`` fails)
    and lets in-flight requests finish for up to ``drain_timeout_s``; then the
    server exits. A second signal exits at once.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        app: FastAPI,
        drain_timeout_s: float,
        on_listening: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(config)
        self._app = app
        self._drain_timeout_s = drain_timeout_s
        self._drain_task: asyncio.Task[None] | None = None
        self._on_listening = on_listening

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start as uvicorn does, then report the HTTP port actually bound."""
        await super().startup(sockets)
        if self._on_listening is not None and self.servers and not self.should_exit:
            self._on_listening(int(self.servers[0].sockets[0].getsockname()[1]))

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_task is not None:
            super().handle_exit(sig, frame)
            return
        logger.info("router: signal %d, draining (up to %.0f s)", sig, self._drain_timeout_s)
        self._app.state.draining = True
        self._drain_task = asyncio.get_event_loop().create_task(self._drain())

    async def _drain(self) -> None:
        idle = await self._app.state.admission.wait_idle(self._drain_timeout_s)
        if not idle:
            logger.warning("router: drain timed out with requests in flight")
        self.should_exit = True


def run_router(config: RouterConfig) -> None:
    """Serve until SIGINT/SIGTERM (draining first)."""
    # Measured, not understood: with torch loaded (as the router always was until its import
    # chain stopped pulling it in), S5's 256-stream check found the router adding -0.7 to 1.3 ms
    # to TTFT p50 in 7 runs; without it 1.2 to 4.8 ms in 8 (target 2 ms), on the same quiet
    # machine, alternating. GC (gc.freeze) and malloc tuning did not explain it. Costs ~1 s of
    # the router's start; the launcher and every other command stay torch-free.
    import torch  # noqa: F401

    app, dispatcher = build_router_app(config)
    uv_config = uvicorn.Config(
        app, host=config.host, port=config.port, log_level="warning", access_log=False, http=config.http
    )

    def on_listening(http_port: int) -> None:
        logger.info("router listening on %s:%d, workers connect to %s", config.host, http_port,
                    dispatcher.endpoint)
        if config.ready_file:
            write_ready_file(config.ready_file, http_port, dispatcher.endpoint)

    server = DrainingServer(uv_config, app, config.drain_timeout_s, on_listening)
    if _use_uvloop(config.event_loop):
        import uvloop

        uvloop.run(server.serve())
    else:
        asyncio.run(server.serve())


def write_ready_file(path: str, http_port: int, control_endpoint: str) -> None:
    """Write the router's ports as JSON, atomically (a reader never sees half a file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"http_port": http_port, "control_endpoint": control_endpoint}, f)
    os.replace(tmp, path)


def _use_uvloop(choice: str) -> bool:
    """Whether to run on uvloop: ``uvloop`` (must be installed), ``asyncio`` or ``auto``."""
    if choice == "asyncio":
        return False
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if choice == "uvloop":
            raise
        return False
    return True
