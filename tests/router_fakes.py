"""A scripted in-memory backend for the router's OpenAI front end, and helpers to talk to it.

The byte tokenizer makes ids predictable: id = byte + 3, BOS = 1, EOS = 2.
Used by the modules in ``tests/unit/router_api/`` (fixtures in its conftest.py) that test the app
against :class:`FakeBackend`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn

from pdserve.request import TokenLogprobs
from pdserve.router.app import create_app
from pdserve.router.backend import GenerationEvent
from pdserve.sampling_params import SamplingParams
from pdserve.tokenizer import load_tokenizer

TOKENIZER = load_tokenizer("tiny")
MODEL = "tiny-served"
MAX_MODEL_LEN = 128


def ids(text: str) -> list[int]:
    """The token ids of ``text`` without BOS."""
    return TOKENIZER.encode(text, add_special_tokens=False)


@dataclass
class Script:
    """What the fake backend does for one generation."""

    chunks: list[list[int]]  # new token ids of each event
    finish_reason: str = "length"
    stop_reason: int | None = None
    hang: bool = False  # after the chunks, wait until cancelled instead of finishing
    error: Exception | None = None  # raised after the chunks
    error_before: Exception | None = None  # raised before any event
    unfinished: bool = False  # end the stream without a finished event (a backend bug)
    num_cached_tokens: int = 3


def text_script(text: str, **kw: Any) -> Script:
    """A script sending ``text`` one token per event."""
    return Script([[t] for t in ids(text)], **kw)


@dataclass
class FakeBackend:
    """Emits scripted token ids; records every call and abort."""

    respond: Callable[[str, list[int], SamplingParams], Script] = lambda *_: text_script("Hello world")
    model_name: str = "tiny"
    max_model_len: int = MAX_MODEL_LEN
    ready: bool = True
    calls: list[tuple[str, list[int], SamplingParams]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    closed_early: list[str] = field(default_factory=list)

    def is_ready(self) -> bool:
        return self.ready

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, trace: Any = None
    ) -> AsyncIterator[GenerationEvent]:
        self.calls.append((request_id, prompt_token_ids, params))
        script = self.respond(request_id, prompt_token_ids, params)
        if script.error_before is not None:
            raise script.error_before
        try:
            for i, chunk in enumerate(script.chunks):
                last = i == len(script.chunks) - 1 and not (script.hang or script.error or script.unfinished)
                logprobs = None
                if params.logprobs is not None:
                    logprobs = [TokenLogprobs(t, -0.25, {t: -0.25, t + 1: -1.5, t + 2: -3.0}) for t in chunk]
                yield GenerationEvent(
                    token_ids=chunk, logprobs=logprobs, finished=last,
                    finish_reason=script.finish_reason if last else None,
                    stop_reason=script.stop_reason if last else None,
                    num_prompt_tokens=len(prompt_token_ids),
                    num_cached_tokens=script.num_cached_tokens,
                )
                await asyncio.sleep(0)
            if script.error is not None:
                raise script.error
            if script.hang:
                await asyncio.Event().wait()
        except (asyncio.CancelledError, GeneratorExit):  # cancelled, or closed by the app
            self.closed_early.append(request_id)
            raise

    async def abort(self, request_id: str) -> None:
        await asyncio.sleep(0)  # like a real backend, it suspends: this must survive a cancelled request
        self.aborted.append(request_id)


@contextlib.asynccontextmanager
async def asgi_client(backend: FakeBackend) -> AsyncIterator[httpx.AsyncClient]:
    """A client calling the app in-process (no sockets), with a 4 KiB body limit."""
    app = create_app(backend, TOKENIZER, served_model_name=MODEL, max_body_bytes=4096)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=10) as c:
        yield c


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON events of an SSE body, checking the framing and the final [DONE]."""
    assert response.headers["content-type"].startswith("text/event-stream")
    body = response.text
    assert body.endswith("data: [DONE]\n\n")
    frames = body.split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]"
    assert all(f.startswith("data: ") for f in frames[:-1])
    return [json.loads(f[len("data: ") :]) for f in frames[:-2]]


def assert_error(
    response: httpx.Response, status: int, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """Check an OpenAI-shaped error response; its ``error`` object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def completion(**kw: Any) -> dict[str, Any]:
    """A /v1/completions body for the served model."""
    return {"model": MODEL, "prompt": "Hi", **kw}


def chat(**kw: Any) -> dict[str, Any]:
    """A /v1/chat/completions body for the served model."""
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **kw}


async def serve(backend: FakeBackend) -> tuple[uvicorn.Server, asyncio.Task[None], str]:
    """Start the app under a real uvicorn server on a free port: the server, its task and its URL."""
    app = create_app(backend, TOKENIZER, served_model_name=MODEL)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, task, f"http://127.0.0.1:{port}"


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll until ``condition()`` holds (fails after ``timeout_s``)."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)
