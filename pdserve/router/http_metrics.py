"""Counting the router's HTTP answers by endpoint and status (Prometheus).

``pdserve_http_responses_total{endpoint, status}``: one count per response,
taken when its status line goes out, whoever produced it (a route, the
API-key check, the admission control, an unknown path). The status says what
kind of error it was: 400 invalid request, 401 bad key, 404 unknown model or
path, 413 body too large, 429 overloaded, 499 client gone before the answer,
503 unavailable or draining. Errors after a stream started (status 200) are
counted by the dispatcher as requests that ended in ``error``.

A pure ASGI middleware: streaming and disconnect detection are untouched.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics
from starlette.types import ASGIApp, Message, Receive, Scope, Send

disable_created_metrics()  # as for every router metric (see pdserve.router.metrics)

#: Endpoints labelled by their path; every other path is ``other`` (bounded label values).
ENDPOINTS = frozenset(
    {"/v1/completions", "/v1/chat/completions", "/v1/models", "/metrics", "/live", "/health", "/ready",
     "/dashboard"}
)


class ResponseCounter:
    """Counts every HTTP response of the app it wraps."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.responses = Counter(
            "pdserve_http_responses",
            "HTTP responses of the router by endpoint and status code",
            ["endpoint", "status"],
            registry=registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else ("/pdserve/*" if path.startswith("/pdserve/") else "other")

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.responses.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
