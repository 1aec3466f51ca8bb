"""A gated in-memory backend for the router front end's security and admission tests, and helpers.

Each generation of :class:`GatedBackend` sends one token, then holds until the test sets
``release``, so streams stay in flight for as long as a test needs. Used by the modules in
``tests/unit/router_gated/`` (fixtures in its conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp

from pdserve.router.app import create_app
from pdserve.router.backend import GenerationEvent
from pdserve.sampling_params import SamplingParams
from pdserve.tokenizer import ByteTokenizer, load_tokenizer

pytestmark = pytest.mark.anyio

MODEL = "tiny-served"
KEY = "sk-pdserve-KEY-0123456789abcdef"
OTHER_KEY = "sk-pdserve-OTHER-fedcba9876543210"
WRONG_KEY = "sk-pdserve-WRONG-5555555555555555"
SECRET_PROMPT = "SECRET-PROMPT-TEXT"
AUTH = {"Authorization": f"Bearer {KEY}"}


class CountingTokenizer(ByteTokenizer):
    """The byte tokenizer, counting how often a prompt was tokenised."""

    def __init__(self) -> None:
        super().__init__(load_tokenizer("tiny").vocab_size)
        self.num_encodes = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.num_encodes += 1
        return super().encode(text, add_special_tokens)


@dataclass
class GatedBackend:
    """Each generation sends one token at once, then holds until ``release`` is set, then finishes.

    With ``token_interval_s`` a held generation keeps sending a token at that interval (load).
    """

    model_name: str = "tiny"
    max_model_len: int = 4096
    ready: bool = True
    token_interval_s: float | None = None
    error: Exception | None = None  # raised instead of the first event
    release: asyncio.Event = field(default_factory=asyncio.Event)
    calls: list[str] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    num_tokens_sent: int = 0

    def is_ready(self) -> bool:
        return self.ready

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, trace: Any = None
    ) -> AsyncIterator[GenerationEvent]:
        self.calls.append(request_id)
        if self.error is not None:
            raise self.error
        yield GenerationEvent([ord("a") + 3], num_prompt_tokens=len(prompt_token_ids))
        while not self.release.is_set():
            if self.token_interval_s is None:
                await self.release.wait()
                break
            await asyncio.sleep(self.token_interval_s)
            self.num_tokens_sent += 1
            yield GenerationEvent([ord(".") + 3], num_prompt_tokens=len(prompt_token_ids))
        yield GenerationEvent(
            [ord("z") + 3], finished=True, finish_reason="stop", num_prompt_tokens=len(prompt_token_ids)
        )

    async def abort(self, request_id: str) -> None:
        await asyncio.sleep(0)
        self.aborted.append(request_id)


def make_app(backend: GatedBackend, tokenizer: CountingTokenizer, **kw: Any) -> FastAPI:
    """The router app over ``backend`` with a 4 KiB body limit; ``kw`` go to ``create_app``."""
    return create_app(backend, tokenizer, served_model_name=MODEL, max_body_bytes=4096, **kw)


def asgi_client(app: FastAPI) -> httpx.AsyncClient:
    """A client calling ``app`` in-process (no sockets)."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test", timeout=10)


@contextlib.asynccontextmanager
async def served(app: ASGIApp) -> AsyncIterator[httpx.AsyncClient]:
    """A real uvicorn server on a free port and a client for it (streams stay open for real)."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10, limits=limits) as c:
            yield c
    finally:
        server.should_exit = True
        await task


def completion(**kw: Any) -> dict[str, Any]:
    """A /v1/completions body for the served model (8 tokens)."""
    return {"model": MODEL, "prompt": "Hi", "max_tokens": 8, **kw}


def chat(**kw: Any) -> dict[str, Any]:
    """A /v1/chat/completions body for the served model (8 tokens)."""
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, **kw}


def assert_error(r: httpx.Response, status: int, code: str | None, type_: str) -> dict[str, Any]:
    """Check an OpenAI-shaped error with this status, code and type; its ``error`` object."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code and body["error"]["type"] == type_
    return body["error"]


async def wait_until(condition: Any, timeout_s: float = 5.0) -> None:
    """Poll until ``condition()`` holds (fails after ``timeout_s``)."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


class OpenStream:
    """A streaming completion held open after its first data event."""

    def __init__(self, client: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str]) -> None:
        self._cm = client.stream("POST", "/v1/completions", json=body, headers=headers)
        self.response: httpx.Response | None = None
        self.lines: list[str] = []

    async def open(self) -> OpenStream:
        self.response = await self._cm.__aenter__()
        assert self.response.status_code == 200
        self._lines = self.response.aiter_lines()
        async for line in self._lines:
            self.lines.append(line)
            if line.startswith("data: {"):
                break
        return self

    async def finish(self) -> str:
        """Read to the end; the whole streamed text (checks the final [DONE])."""
        async for line in self._lines:
            self.lines.append(line)
        await self._cm.__aexit__(None, None, None)
        data = [line[len("data: ") :] for line in self.lines if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        return "".join(json.loads(d)["choices"][0]["text"] for d in data[:-1])

    async def hang_up(self) -> None:
        await self._cm.__aexit__(None, None, None)


