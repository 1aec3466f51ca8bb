"""The router process: OpenAI front end + dispatcher, served by uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI

from pdserve.model.arch import load_arch_config
from pdserve.model.tokenizer import load_tokenizer
from pdserve.router.app import create_app
from pdserve.router.dispatcher import Dispatcher, DispatcherConfig

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
        policy: routing policy name.
        max_model_len: context limit; defaults to the model's.
        lease_s: heartbeat lease of workers.
        secret: cluster secret workers must present.
    """

    model: str = "tiny"
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    control_host: str = "127.0.0.1"
    control_port: int = 0
    policy: str = "least_loaded"
    max_model_len: int | None = None
    lease_s: float = 3.0
    secret: str = field(default="", repr=False)


def build_router_app(config: RouterConfig) -> tuple[FastAPI, Dispatcher]:
    """The FastAPI app with its dispatcher (started and stopped by the app's lifespan)."""
    tokenizer = load_tokenizer(config.model)
    arch = load_arch_config(config.model)
    max_model_len = min(config.max_model_len or arch.max_position_embeddings, arch.max_position_embeddings)
    dispatcher = Dispatcher(
        DispatcherConfig(
            bind=f"tcp://{config.control_host}:{config.control_port}",
            policy=config.policy,
            lease_s=config.lease_s,
            secret=config.secret,
        ),
        model_name=config.model,
        max_model_len=max_model_len,
    )
    app = create_app(dispatcher, tokenizer, served_model_name=config.served_model_name or config.model)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await dispatcher.start()
        try:
            yield
        finally:
            await dispatcher.stop()

    app.router.lifespan_context = lifespan

    @app.get("/pdserve/workers")
    async def workers(stats: bool = True) -> dict[str, object]:
        """Registered workers and (unless ``?stats=false``) their counters, asked for now."""
        counters = {s.worker_id: s for s in await dispatcher.worker_stats()} if stats else {}
        return {
            "control_endpoint": dispatcher.endpoint,
            "kv_bytes_relayed": dispatcher.num_kv_bytes,
            "workers": [
                {
                    "worker_id": w.worker_id,
                    "role": w.role.value,
                    "pid": w.pid,
                    "num_inflight": w.num_inflight,
                    "stats": _plain(counters.get(w.worker_id)),
                }
                for w in dispatcher.registry.all()
            ],
        }

    return app, dispatcher


def _plain(value: object) -> object:
    import msgspec

    return msgspec.to_builtins(value) if value is not None else None


def run_router(config: RouterConfig) -> None:
    """Serve until SIGINT/SIGTERM."""
    app, _ = build_router_app(config)
    server = uvicorn.Server(
        uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", access_log=False)
    )
    asyncio.run(server.serve())
