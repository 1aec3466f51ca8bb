"""The OpenAI-compatible HTTP front end of the router.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /v1/models``, ``GET /health`` (process up), ``GET /ready`` (backend ready).

Lifecycle of one generation request:

1. Read the body (at most ``max_body_bytes``, else 413) and parse it strictly
   into a request model; the model name must be the served one (404).
   (:mod:`~pdserve.router.errors`, :mod:`~pdserve.router.prompts`)
2. Tokenise (chat: render the template, then encode without adding special
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

Prompt text and request headers are never logged.
"""

from __future__ import annotations

import logging
import time
import uuid

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from pdserve.model.tokenizer import Tokenizer
from pdserve.router.backend import Backend
from pdserve.router.errors import add_exception_handlers, as_api_error, read_body
from pdserve.router.generation import EventStreamResponse, generate, merge, unless_disconnected
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
    sse_events,
)

logger = logging.getLogger(__name__)


class _Server:
    """Holds what the routes share; one per app."""

    def __init__(
        self, backend: Backend, tokenizer: Tokenizer, served_model_name: str, max_body_bytes: int
    ) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.model = served_model_name
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        self.planner = Planner(backend, tokenizer, served_model_name)
        self.logprobs = LogprobsFormatter(tokenizer)

    async def serve(self, request: Request, chat: bool) -> Response:
        """Answer one generation request (steps 1-5 of the module docstring)."""
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        fmt: Format = (ChatFormat if chat else CompletionFormat)(self.model, self.logprobs)
        try:
            body = await read_body(request, self.max_body_bytes)
            model: type[GenerationRequest] = ChatCompletionRequest if chat else CompletionRequest
            req = parse(model, body)
            plan = await anyio.to_thread.run_sync(self.planner.plan, req, response_id)
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
                return EventStreamResponse(sse_events(plan, fmt, first, outputs), headers=headers)
            collected = await unless_disconnected(request, collect(plan, outputs))
            if collected is None:
                return Response(status_code=499)
            results, usage = collected
            return Response(fmt.body(plan, results, usage).model_dump_json(), media_type="application/json")
        except ClientDisconnect:  # gone while sending the body
            return Response(status_code=499)
        except Exception as exc:
            return as_api_error(exc, response_id).response()


def create_app(
    backend: Backend, tokenizer: Tokenizer, *, served_model_name: str, max_body_bytes: int = 4 << 20
) -> FastAPI:
    """The router's HTTP app, serving ``served_model_name`` through ``backend``."""
    server = _Server(backend, tokenizer, served_model_name, max_body_bytes)
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.serve(request, chat=True)

    @app.get("/v1/models")
    async def models() -> Response:
        card = ModelCard(id=served_model_name, created=server.created, max_model_len=backend.max_model_len)
        return Response(ModelList(data=[card]).model_dump_json(), media_type="application/json")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Response:
        if backend.is_ready():
            return Response('{"status":"ready"}', media_type="application/json")
        return Response('{"status":"not_ready"}', 503, media_type="application/json")

    add_exception_handlers(app)
    return app
