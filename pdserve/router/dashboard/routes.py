"""The dashboard's two routes and the background task that samples.

1. :func:`mount_dashboard` builds a :class:`Dashboard` over the dispatcher and
   tracer, hooks its sampling task into the app's lifespan, and adds
   ``GET /dashboard`` (the page) and ``GET /pdserve/dashboard/data`` (JSON).
2. While the router runs, a tick every ``interval_s`` takes a sample and
   notes what changed among the workers (:mod:`.sampler`, :mod:`.fleet`).
3. The page asks for the data once a second with the sequence numbers it has
   seen (``samples_after``, ``events_after``, ``traces_after``) and gets only
   what is new, plus the current workers, pools and KV flows.

The page is one HTML document with its CSS and JavaScript inlined, under a
Content-Security-Policy that allows no network access but this router.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response

from pdserve.router.dashboard.fleet import EventLog, Fleet
from pdserve.router.dashboard.sampler import Sampler
from pdserve.router.security import KEY_COOKIE

if TYPE_CHECKING:
    from pdserve.router.dispatcher import Dispatcher
    from pdserve.router.tracing import Tracer

logger = logging.getLogger(__name__)

PAGE_PATH = "/dashboard"
DATA_PATH = "/pdserve/dashboard/data"
#: The paths that take the API key from a query parameter or cookie (a browser opening a page).
BROWSER_PATHS = frozenset({PAGE_PATH, DATA_PATH})
DATA_VERSION = 1


@dataclass(frozen=True)
class SLOConfig:
    """Latency objectives drawn as lines on the charts (None: not set)."""

    ttft_ms: float | None = None
    itl_ms: float | None = None

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and not value > 0:
                raise ValueError(f"slo {name}={value}: must be a positive number of milliseconds")


class Dashboard:
    """Sampler, fleet and events of one router; ``data`` builds what the page reads."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        tracer: Tracer,
        slo: SLOConfig | None = None,
        interval_s: float = 1.0,
        window_s: float = 5.0,
        app_state: Any = None,
        deployment: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.slo = slo or SLOConfig()
        self.app_state = app_state
        self.events = EventLog()
        self.sampler = Sampler(
            dispatcher.metrics.registry,
            dispatcher.registry,
            lambda: dispatcher.num_inflight,
            interval_s=interval_s,
            window_s=window_s,
        )
        self.fleet = Fleet(dispatcher.registry, dispatcher.counters, self.events, deployment=deployment)
        tracer.listeners.append(self.sampler.on_trace)
        self.started_unix_s = time.time()
        self.last_data_ms = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start sampling (on the running event loop)."""
        self.events.add("router_started")
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop sampling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                self.fleet.observe()
                self.sampler.tick()
            except Exception:  # a bug here must not take the router down
                logger.exception("dashboard: sampling failed")
            await asyncio.sleep(self.sampler.interval_s)

    def data(self, samples_after: int = 0, events_after: int = 0, traces_after: int = 0) -> dict[str, Any]:
        """What the page reads: the state now, and the samples, events and traces after the given numbers."""
        started = time.perf_counter()
        self.fleet.observe()
        workers = self.fleet.workers()
        s = self.sampler
        totals = s.totals
        state = self.app_state
        admission = getattr(state, "admission", None)
        out = {
            "version": DATA_VERSION,
            "now": round(time.time(), 3),
            "router": {
                "model": self.dispatcher.model_name,
                "started": round(self.started_unix_s, 3),
                "control_endpoint": self.dispatcher.endpoint,
                "draining": bool(getattr(state, "draining", False)),
                "inflight": self.dispatcher.num_inflight,
                "admitted": admission.inflight if admission is not None else None,
                "max_inflight": admission.max_inflight if admission is not None else None,
                "slo": asdict(self.slo),
                "interval_s": s.interval_s,
                "window_s": s.window_s,
                "last_tick_ms": s.last_tick_ms,
                "last_data_ms": self.last_data_ms,
                "totals": {
                    **{k: int(v) for k, v in totals.outcomes.items()},
                    "tokens": int(totals.tokens),
                    "kv_bytes": int(totals.kv_bytes),
                    "http": {k: int(v) for k, v in sorted(totals.http.items())},
                },
                "recovery": asdict(self.dispatcher.counters),
                "supervised": bool(self.fleet.supervision.get("supervised")),
                "launcher": self.fleet.supervision.get("launcher") or None,
            },
            "pools": self.fleet.pools(workers),
            "workers": workers,
            "flows": s.flows(),
            "samples": s.samples_after(samples_after),
            "events": self.events.after(events_after),
            "traces": s.traces_after(traces_after),
            "seq": {"samples": s.last_seq, "events": self.events.last_seq, "traces": s.last_trace_seq},
        }
        self.last_data_ms = round((time.perf_counter() - started) * 1e3, 3)
        return out


def _page() -> tuple[bytes, str]:
    """The page with its CSS and JavaScript inlined, and the CSP hash of its script."""
    static = resources.files("pdserve.router.dashboard") / "static"
    html = (static / "index.html").read_text(encoding="utf-8")
    css = (static / "dashboard.css").read_text(encoding="utf-8")
    js = "\n".join((static / name).read_text(encoding="utf-8") for name in ("common.js", "dashboard.js"))
    digest = base64.b64encode(hashlib.sha256(js.encode()).digest()).decode()
    page = html.replace("/*CSS*/", css).replace("/*JS*/", js)
    return page.encode("utf-8"), f"'sha256-{digest}'"


def mount_dashboard(
    app: FastAPI,
    dispatcher: Dispatcher,
    tracer: Tracer,
    slo: SLOConfig | None = None,
    deployment: Callable[[], dict[str, Any]] | None = None,
) -> Dashboard:
    """Add the dashboard's routes to the router's app and sample while the app runs.

    ``deployment``: the supervisor's view (``Deployment.view``): targets, slot states, placement.
    """
    dash = Dashboard(dispatcher, tracer, slo, app_state=app.state, deployment=deployment)
    page, script_hash = _page()
    headers = {
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        # No network access but this router; the inline script is allowed by its hash only.
        "Content-Security-Policy": (
            f"default-src 'none'; script-src {script_hash}; style-src 'unsafe-inline'; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"
        ),
    }
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
        async with inner(a) as state:
            dash.start()
            try:
                yield state
            finally:
                await dash.stop()

    app.router.lifespan_context = lifespan

    @app.get(PAGE_PATH)
    async def dashboard_page(request: Request) -> Response:
        response = Response(page, media_type="text/html; charset=utf-8", headers=headers)
        key = request.query_params.get("key")
        if key:  # (the middleware has checked it) keep it for the data requests, out of scripts
            response.set_cookie(KEY_COOKIE, key, httponly=True, samesite="strict", path="/")
        return response

    @app.get(DATA_PATH)
    async def dashboard_data(
        samples_after: int = 0, events_after: int = 0, traces_after: int = 0
    ) -> Response:
        body = msgspec.json.encode(dash.data(samples_after, events_after, traces_after))
        return Response(body, media_type="application/json", headers={"Cache-Control": "no-store"})

    return dash
