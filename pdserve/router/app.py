"""The OpenAI-compatible HTTP front end of the router.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /v1/models``, and the probes ``GET /live`` and ``GET /health`` (process
up) and ``GET /ready`` (backend ready and not draining).

With ``api_keys``, every route but the probes needs ``Authorization: Bearer
<key>`` (401 before anything else runs; :mod:`~pdserve.router.security`).

Lifecycle of one generation request:

0. Admission, before the body is read: 503 while draining
   (``app.state.draining``), 429 at ``max_inflight``; both with ``Retry-After``.
   (:mod:`~pdserve.router.admission`)
1. Read the body (at most ``max_body_bytes``, else 413) and parse it strictly
   into a request model; the model name must be the served one (404). Take
   one admission slot per choice (prompts × n), or 429/503 — still before
   tokenising. The slots are held until the request's generations have ended
   (a stream: until its last event is sent or its client left).
   (:mod:`~pdserve.router.errors`, :mod:`~pdserve.router.prompts`)
2. Tokenise (on the event loop, or in a thread for bodies over
   ``INLINE_PLAN_MAX_BYTES``; chat: render the template, then encode without adding special
   tokens again) and check token ids, the context length and the sampling
   values. Every failure is a 400 before the backend sees anything.
   (:mod:`~pdserve.router.prompts`)
3. Start one backend generation per choice (prompt × n). Each has its own
   :class:`Detokenizer`, which turns token ids into text, cuts stop strings
   and holds back text that could still become one.
   (:mod:`~pdserve.router.generation`)
4. Non-streaming: collect every choice and answer one JSON body. Streaming:
   wait for the first output (so an overloaded backend is still a plain
   429/503), then send SSE chunks; a later error becomes an ``error`` event,
   and the stream always ends with ``data: [DONE]``.
   (:mod:`~pdserve.router.responses`)
5. A generation that ends without the backend's finished event (stop string,
   client gone, error) is aborted in the backend, shielded from cancellation
   so that it happens while the request is being torn down.
   (:mod:`~pdserve.router.generation`)

Prompt text, request headers (``Authorization`` included) and API keys are
never logged.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry
from starlette.requests import ClientDisconnect

from pdserve.router.admission import Admission, Ticket
from pdserve.router.backend import Backend
from pdserve.router.dashboard.routes import BROWSER_PATHS
from pdserve.router.errors import add_exception_handlers, as_api_error, read_body
from pdserve.router.generation import EventStreamResponse, generate, merge, unless_disconnected
from pdserve.router.http_metrics import ResponseCounter
from pdserve.router.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    ModelCard,
    ModelList,
)
from pdserve.router.prompts import Planner, parse
from pdserve.router.responses import (
    ChatFormat,
    CompletionFormat,
    Format,
    LogprobsFormatter,
    collect,
    dump_json,
    sse_events,
)
from pdserve.router.security import APIKeyMiddleware, APIKeys
from pdserve.router.startup import StartupGate, gate_closed
from pdserve.router.tracing import Tracer
from pdserve.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

#: Requests with bodies up to this size are tokenised on the event loop (tens of µs);
#: bigger ones in a worker thread, so that a long prompt does not stall other requests.
INLINE_PLAN_MAX_BYTES = 2048


class _Server:
    """Holds what the routes share; one per app."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: Tokenizer,
        served_model_name: str,
        max_body_bytes: int,
        admission: Admission,
        tracer: Tracer,
        gate: StartupGate,
    ) -> None:
        self.backend = backend
        self.gate = gate
        self.tracer = tracer
        self.admission = admission
        self.tokenizer = tokenizer
        self.model = served_model_name
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        self.planner = Planner(backend, tokenizer, served_model_name)
        self.logprobs = LogprobsFormatter(tokenizer)

    async def serve(self, request: Request, chat: bool) -> Response:
        """Answer one generation request (steps 1-5 of the module docstring)."""
        arrived_s = time.perf_counter()
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        fmt: Format = (ChatFormat if chat else CompletionFormat)(self.model, self.logprobs)
        ticket: Ticket | None = None  # released in `finally` unless a stream took it over
        try:
            self.admission.check()  # draining / full: refuse before reading anything
            if self.gate.must_wait:  # start-up, or a reshape in progress: wait for a serving path
                await self.gate.wait()
            body = await read_body(request, self.max_body_bytes)
            model: type[GenerationRequest] = ChatCompletionRequest if chat else CompletionRequest
            req = parse(model, body)
            ticket = self.admission.admit(self.planner.num_choices(req), "n" if req.n > 1 else "prompt")
            if len(body) <= INLINE_PLAN_MAX_BYTES:  # tokenising it costs less than a thread hop
                plan = self.planner.plan(req, response_id)
            else:
                plan = await anyio.to_thread.run_sync(self.planner.plan, req, response_id)
            plan.return_trace = self.tracer.in_responses
            for choice in plan.choices:
                choice.trace = self.tracer.start(choice.request_id, arrived_s)
                choice.trace.num_prompt_tokens = len(choice.prompt_token_ids)
            logger.debug(
                "%s: %d choice(s), %d prompt tokens, stream=%s",
                response_id, len(plan.choices), plan.num_prompt_tokens, plan.stream,
            )
            outputs = merge([generate(self.backend, self.tokenizer, c) for c in plan.choices])
            if plan.stream:
                first = await unless_disconnected(request, anext(outputs))
                if first is None:
                    return Response(status_code=499)
                headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
                events = sse_events(plan, fmt, first, outputs)
                response = EventStreamResponse(events, headers=headers, on_close=ticket.release)
                ticket = None
                return response
            collected = await unless_disconnected(request, collect(plan, outputs))
            if collected is None:
                return Response(status_code=499)
            results, usage = collected
            return Response(dump_json(fmt.body(plan, results, usage)), media_type="application/json")
        except ClientDisconnect:  # gone while sending the body
            return Response(status_code=499)
        except Exception as exc:
            return as_api_error(exc, response_id).response()
        finally:
            if ticket is not None:
                ticket.release()


def create_app(
    backend: Backend,
    tokenizer: Tokenizer,
    *,
    served_model_name: str,
    max_body_bytes: int = 4 << 20,
    api_keys: Sequence[str] = (),
    max_inflight: int | None = None,
    tracer: Tracer | None = None,
    registry: CollectorRegistry | None = None,
    startup_wait_s: float = 120.0,
) -> FastAPI:
    """The router's HTTP app, serving ``served_model_name`` through ``backend``.

    Args:
        backend: runs the generations.
        tokenizer: the served model's tokenizer.
        served_model_name: the ``model`` clients name.
        max_body_bytes: largest request body (413 past it).
        api_keys: when not empty, every route but ``/live``, ``/health`` and
            ``/ready`` needs ``Authorization: Bearer <one of them>`` (else 401).
        max_inflight: most generations (choices: prompts × n) admitted and not
            yet ended; past it a request is answered 429 with ``Retry-After``.
            None: no limit.
        tracer: receives every generation's trace (:mod:`~pdserve.router.tracing`);
            whether answers carry them is its ``in_responses``. Default: one
            without metrics that keeps traces out of answers.
        registry: where to count responses by endpoint and status
            (:mod:`~pdserve.router.http_metrics`); None: not counted.
        startup_wait_s: until the first complete serving path registers, a generation
            request waits this long for it, then gets 503 (:mod:`~pdserve.router.startup`).

    On ``app.state``: ``draining`` (False; the server sets it True on SIGTERM,
    after which new generation requests get 503 and ``/ready`` 503 while
    admitted ones run to the end), ``tracer`` and ``admission`` (an
    :class:`~pdserve.router.admission.Admission`: ``inflight`` and
    ``await wait_idle(timeout_s)``).
    """
    keys = APIKeys(api_keys)
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.draining = False
    admission = Admission(max_inflight, is_draining=lambda: bool(app.state.draining))
    app.state.admission = admission
    app.state.tracer = tracer = tracer if tracer is not None else Tracer()
    app.state.gate = gate = StartupGate(backend.is_ready, startup_wait_s)
    server = _Server(backend, tokenizer, served_model_name, max_body_bytes, admission, tracer, gate)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.serve(request, chat=True)

    @app.get("/v1/models")
    async def models() -> Response:
        if not gate.open:  # ready means ready: 200 only once a request can be served
            return as_api_error(gate_closed(), "-").response()
        card = ModelCard(id=served_model_name, created=server.created, max_model_len=backend.max_model_len)
        return Response(ModelList(data=[card]).model_dump_json(), media_type="application/json")

    @app.get("/live")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Response:
        if app.state.draining:
            return Response('{"status":"draining"}', 503, media_type="application/json")
        if backend.is_ready():
            return Response('{"status":"ready"}', media_type="application/json")
        return Response('{"status":"not_ready"}', 503, media_type="application/json")

    add_exception_handlers(app)
    if keys:
        app.add_middleware(APIKeyMiddleware, api_keys=keys, browser_paths=BROWSER_PATHS)
    if registry is not None:  # outermost: counts the 401s too
        app.add_middleware(ResponseCounter, registry=registry)
    return app
