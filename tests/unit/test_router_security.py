"""The router front end's API keys, overload protection (429), draining (503) and probes.

A gated in-memory backend holds its generations open until the test releases
them, so streams stay in flight for as long as a test needs. Every test that
admits requests ends with nothing left in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdserve.router.admission import Admission
from pdserve.router.app import create_app
from pdserve.router.backend import BackendError, GenerationEvent
from pdserve.router.security import APIKeys
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


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def backend() -> GatedBackend:
    return GatedBackend()


@pytest.fixture
def tokenizer() -> CountingTokenizer:
    return CountingTokenizer()


def make_app(backend: GatedBackend, tokenizer: CountingTokenizer, **kw: Any) -> FastAPI:
    return create_app(backend, tokenizer, served_model_name=MODEL, max_body_bytes=4096, **kw)


def asgi_client(app: FastAPI) -> httpx.AsyncClient:
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
    return {"model": MODEL, "prompt": "Hi", "max_tokens": 8, **kw}


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, **kw}


def assert_error(r: httpx.Response, status: int, code: str | None, type_: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code and body["error"]["type"] == type_
    return body["error"]


async def wait_until(condition: Any, timeout_s: float = 5.0) -> None:
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


# -- API keys --------------------------------------------------------------------------------

INFERENCE_ROUTES = [
    ("POST", "/v1/completions", completion()),
    ("POST", "/v1/chat/completions", chat()),
    ("POST", "/v1/completions", completion(stream=True)),
    ("GET", "/v1/models", None),
]


@pytest.mark.parametrize(("method", "path", "body"), INFERENCE_ROUTES)
async def test_inference_routes_need_a_valid_key(
    backend: GatedBackend, tokenizer: CountingTokenizer, method: str, path: str, body: dict | None
) -> None:
    backend.release.set()
    app = make_app(backend, tokenizer, api_keys=[KEY, OTHER_KEY])
    async with asgi_client(app) as c:
        refused = [
            {},
            {"Authorization": f"Bearer {WRONG_KEY}"},
            {"Authorization": f"Bearer {KEY}x"},  # a prefix of a valid key is not it
            {"Authorization": f"Bearer {KEY[:-1]}"},
            {"Authorization": f"Basic {KEY}"},  # right secret, wrong scheme
            {"Authorization": "Bearer"},
            {"X-Api-Key": KEY},
        ]
        for headers in refused:
            r = await c.request(method, path, json=body, headers=headers)
            error = assert_error(r, 401, "invalid_api_key", "invalid_request_error")
            assert r.headers["www-authenticate"] == "Bearer"
            assert KEY not in r.text and WRONG_KEY not in r.text and KEY not in str(r.headers)
            assert "Bearer" in error["message"] or "Incorrect" in error["message"]
        assert backend.calls == [] and tokenizer.num_encodes == 0  # nothing ran for them

        for key in (KEY, OTHER_KEY, f"  {KEY} "):
            for scheme in ("Bearer", "bearer"):
                r = await c.request(method, path, json=body, headers={"Authorization": f"{scheme} {key}"})
                assert r.status_code == 200, r.text
                assert KEY not in r.text and OTHER_KEY not in r.text
    assert app.state.admission.inflight == 0


async def test_unknown_routes_need_a_key_too(backend: GatedBackend, tokenizer: CountingTokenizer) -> None:
    async with asgi_client(make_app(backend, tokenizer, api_keys=[KEY])) as c:
        assert_error(await c.get("/v1/nothing"), 401, "invalid_api_key", "invalid_request_error")
        assert_error(await c.get("/pdserve/anything"), 401, "invalid_api_key", "invalid_request_error")
        assert (await c.get("/v1/nothing", headers=AUTH)).status_code == 404


async def test_refused_keys_are_counted(backend: GatedBackend, tokenizer: CountingTokenizer) -> None:
    registry = CollectorRegistry()
    async with asgi_client(make_app(backend, tokenizer, api_keys=[KEY], registry=registry)) as c:
        for _ in range(2):
            assert (await c.post("/v1/completions", json={"prompt": "x"})).status_code == 401
        assert (await c.get("/live")).status_code == 200
    count = registry.get_sample_value
    assert count("pdserve_http_responses_total", {"endpoint": "/v1/completions", "status": "401"}) == 2
    assert count("pdserve_http_responses_total", {"endpoint": "/live", "status": "200"}) == 1


async def test_probes_answer_without_a_key(backend: GatedBackend, tokenizer: CountingTokenizer) -> None:
    async with asgi_client(make_app(backend, tokenizer, api_keys=[KEY])) as c:
        for path in ("/live", "/health", "/ready"):
            r = await c.get(path)
            assert r.status_code == 200, (path, r.text)
        backend.ready = False
        assert (await c.get("/ready")).status_code == 503
        assert (await c.get("/live")).status_code == 200  # no backend check


async def test_no_keys_means_no_auth(backend: GatedBackend, tokenizer: CountingTokenizer) -> None:
    backend.release.set()
    async with asgi_client(make_app(backend, tokenizer)) as c:
        assert (await c.post("/v1/completions", json=completion())).status_code == 200
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer anything"})).status_code == 200


def test_bad_key_configuration_is_refused_without_echoing_the_key() -> None:
    with pytest.raises(TypeError):
        APIKeys(KEY)  # one string is not a list of one-character keys
    for bad in ("", "has space", "tab\there", "ключ"):
        with pytest.raises(ValueError, match=r"api_keys\[1\]") as info:
            APIKeys([KEY, bad])
        assert (bad or "\x00") not in str(info.value) and KEY not in str(info.value)
    keys = APIKeys([KEY])
    assert KEY not in repr(keys) and KEY not in str(vars(keys))
    assert keys.accepts(KEY.encode()) and not keys.accepts(WRONG_KEY.encode())
    assert not APIKeys([]) and bool(keys)


async def test_key_and_prompt_never_logged(
    backend: GatedBackend, tokenizer: CountingTokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing the router logs, at any level, holds a key, the Authorization header or prompt text."""
    app = make_app(backend, tokenizer, api_keys=[KEY])
    with caplog.at_level(logging.DEBUG):
        async with served(app) as c:
            await c.post("/v1/completions", json=completion(prompt=SECRET_PROMPT))  # no key
            await c.post(
                "/v1/completions",
                json=completion(prompt=SECRET_PROMPT),
                headers={"Authorization": f"Bearer {WRONG_KEY}"},
            )
            backend.release.set()
            r = await c.post("/v1/completions", json=completion(prompt=SECRET_PROMPT), headers=AUTH)
            assert r.status_code == 200
            r = await c.post(
                "/v1/chat/completions",
                headers=AUTH,
                json=chat(stream=True, messages=[{"role": "user", "content": SECRET_PROMPT}]),
            )
            assert r.status_code == 200
            backend.error = RuntimeError("internal failure")  # logged at ERROR with a traceback
            r = await c.post("/v1/completions", json=completion(prompt=SECRET_PROMPT), headers=AUTH)
            assert r.status_code == 500
    # the test's own HTTP client logs too; only the server side is checked
    records = [rec for rec in caplog.records if not rec.name.startswith(("httpx", "httpcore"))]
    assert any(rec.levelno >= logging.ERROR for rec in records)  # the check saw real log output
    assert any(rec.name.startswith("pdserve") and rec.levelno == logging.DEBUG for rec in records)
    text = "\n".join(caplog.handler.format(rec) for rec in records)
    for secret in (KEY, WRONG_KEY, SECRET_PROMPT, "Bearer", "authorization", "Authorization"):
        assert secret not in text, secret
    assert app.state.admission.inflight == 0


# -- overload --------------------------------------------------------------------------------


async def test_past_max_inflight_is_a_fast_429_then_recovers(
    backend: GatedBackend, tokenizer: CountingTokenizer
) -> None:
    app = make_app(backend, tokenizer, api_keys=[KEY], max_inflight=2)
    admission: Admission = app.state.admission
    async with served(app) as c:
        streams = [await OpenStream(c, completion(stream=True), AUTH).open() for _ in range(2)]
        assert admission.inflight == 2
        num_calls, num_encodes = len(backend.calls), tokenizer.num_encodes

        for path, body in [
            ("/v1/completions", completion()),
            ("/v1/chat/completions", chat(stream=True)),
            ("/v1/completions", completion(prompt="x" * 10_000)),
        ]:  # > max_body_bytes
            r = await c.post(path, json=body, headers=AUTH)
            error = assert_error(r, 429, "rate_limit_exceeded", "rate_limit_error")  # not 413: body unread
            assert r.headers["retry-after"] == "1" and "2" in error["message"]
        # auth still comes first: a client without a key learns nothing about the load
        assert_error(
            await c.post("/v1/completions", json=completion()),
            401,
            "invalid_api_key",
            "invalid_request_error",
        )
        assert (await c.get("/v1/models", headers=AUTH)).status_code == 200  # not a generation
        assert len(backend.calls) == num_calls and tokenizer.num_encodes == num_encodes

        backend.release.set()
        assert [await s.finish() for s in streams] == ["az", "az"]
        await wait_until(lambda: admission.inflight == 0)
        r = await c.post("/v1/completions", json=completion(n=2), headers=AUTH)
        assert r.status_code == 200 and [ch["text"] for ch in r.json()["choices"]] == ["az", "az"]
    assert admission.inflight == 0 and backend.aborted == []


async def test_every_choice_takes_a_slot(backend: GatedBackend, tokenizer: CountingTokenizer) -> None:
    app = make_app(backend, tokenizer, max_inflight=3)
    admission: Admission = app.state.admission
    async with served(app) as c:
        # a request that can never fit is a 400, not a 429 a client would retry forever
        r = await c.post("/v1/completions", json=completion(n=4))
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        r = await c.post("/v1/completions", json=completion(prompt=["a", "b", "c", "d"]))
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        assert backend.calls == [] and admission.inflight == 0

        held = await OpenStream(c, completion(stream=True, prompt=["a", "b"]), {}).open()  # 2 choices
        assert admission.inflight == 2
        assert_error(
            await c.post("/v1/completions", json=completion(n=2)),
            429,
            "rate_limit_exceeded",
            "rate_limit_error",
        )
        assert_error(
            await c.post("/v1/completions", json=completion(prompt=[[5], [6]])),
            429,
            "rate_limit_exceeded",
            "rate_limit_error",
        )
        one = await OpenStream(c, completion(stream=True), {}).open()  # the third slot
        assert admission.inflight == 3
        assert_error(
            await c.post("/v1/chat/completions", json=chat()), 429, "rate_limit_exceeded", "rate_limit_error"
        )
        backend.release.set()
        assert sorted(await held.finish()) == list("aazz") and await one.finish() == "az"
        await wait_until(lambda: admission.inflight == 0)
        assert (await c.post("/v1/completions", json=completion(n=3))).status_code == 200
    assert admission.inflight == 0


async def test_rejection_latency_under_load(backend: GatedBackend, tokenizer: CountingTokenizer) -> None:
    """Streams keep the server busy sending tokens; 100 concurrent newcomers are all refused quickly.

    Measured on the server (request in → 429 status line out) and, looser, at the client, whose
    100 new connections share the test's event loop.
    """
    backend.token_interval_s = 0.001
    app = make_app(backend, tokenizer, max_inflight=8)
    server_ms: list[float] = []

    async def timed_app(scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 429:
                server_ms.append(1000 * (time.perf_counter() - start))
            await send(message)

        await app(scope, receive, timed_send)

    async with served(timed_app) as c:
        streams = [await OpenStream(c, completion(stream=True), {}).open() for _ in range(8)]
        num_calls, num_encodes = len(backend.calls), tokenizer.num_encodes
        sent_before = backend.num_tokens_sent

        async def timed_post(i: int) -> tuple[int, float]:
            path, body = (
                ("/v1/completions", completion(prompt="y" * 3000))
                if i % 2
                else ("/v1/chat/completions", chat(stream=True))
            )
            start = time.perf_counter()
            r = await c.post(path, json=body)
            return r.status_code, 1000 * (time.perf_counter() - start)

        results = await asyncio.gather(*(timed_post(i) for i in range(100)))
        single_client_ms = min([(await timed_post(1))[1] for _ in range(20)])
        assert backend.num_tokens_sent > sent_before  # the streams were busy meanwhile
        assert {status for status, _ in results} == {429} and len(server_ms) == 120
        client_ms, server_median_ms = sorted(ms for _, ms in results), sorted(server_ms)[60]
        print(
            f"\n429 latency with 8 streams sending a token/ms: server median {server_median_ms:.2f} ms, "
            f"max {max(server_ms):.2f} ms; client, one at a time {single_client_ms:.1f} ms, "
            f"100 at once median {client_ms[50]:.0f} ms, max {client_ms[-1]:.0f} ms"
        )
        assert max(server_ms) < 1000 and single_client_ms < 1000  # loose: only the order of magnitude
        assert len(backend.calls) == num_calls and tokenizer.num_encodes == num_encodes
        backend.release.set()
        for s in streams:
            await s.finish()
        await wait_until(lambda: app.state.admission.inflight == 0)


async def test_slots_come_back_on_every_ending(backend: GatedBackend, tokenizer: CountingTokenizer) -> None:
    """Errors, rejections and departed clients release their slots; nothing leaks."""
    app = make_app(backend, tokenizer, max_inflight=1)
    admission: Admission = app.state.admission
    async with served(app) as c:
        r = await c.post("/v1/completions", json=completion(prompt="x" * 3000, max_tokens=2000))
        assert r.status_code == 400  # context too long, after admission
        assert (await c.post("/v1/completions", json=completion(temperature=-1))).status_code == 400
        assert (await c.post("/v1/completions", json=completion(model="other"))).status_code == 404
        backend.error = BackendError("no workers", 503)
        assert (await c.post("/v1/completions", json=completion())).status_code == 503
        assert (await c.post("/v1/completions", json=completion(stream=True))).status_code == 503
        assert admission.inflight == 0
        backend.error = None
        num_aborted = len(backend.aborted)  # the failed generations were aborted too

        stream = await OpenStream(c, completion(stream=True), {}).open()
        assert admission.inflight == 1
        await stream.hang_up()  # the client leaves mid-stream
        await wait_until(lambda: admission.inflight == 0)
        assert len(backend.aborted) == num_aborted + 1

        with pytest.raises(httpx.ReadTimeout):  # the client leaves a non-streamed request
            await c.post("/v1/completions", json=completion(), timeout=0.3)
        await wait_until(lambda: admission.inflight == 0)
        assert len(backend.aborted) == num_aborted + 2
        assert await admission.wait_idle(0.01)


async def test_admission_bookkeeping() -> None:
    with pytest.raises(ValueError, match="max_inflight"):
        Admission(0, lambda: False)
    admission = Admission(2, lambda: False)
    ticket = admission.admit(2)
    assert admission.inflight == 2
    assert not await admission.wait_idle(0.01)
    waiter = asyncio.create_task(admission.wait_idle(5))
    await asyncio.sleep(0)
    ticket.release()
    ticket.release()  # idempotent
    assert admission.inflight == 0 and await waiter


# -- draining --------------------------------------------------------------------------------


async def test_draining_refuses_new_requests_and_finishes_old_ones(
    backend: GatedBackend, tokenizer: CountingTokenizer
) -> None:
    app = make_app(backend, tokenizer, api_keys=[KEY], max_inflight=10)
    admission: Admission = app.state.admission
    async with served(app) as c:
        assert (await c.get("/ready")).status_code == 200
        stream = await OpenStream(c, completion(stream=True), AUTH).open()
        app.state.draining = True  # what the server does on SIGTERM

        r = await c.get("/ready")
        assert r.status_code == 503 and r.json() == {"status": "draining"}
        assert (await c.get("/live")).status_code == 200 and (await c.get("/health")).status_code == 200
        for path, body in [("/v1/completions", completion()), ("/v1/chat/completions", chat(stream=True))]:
            r = await c.post(path, json=body, headers=AUTH)
            assert_error(r, 503, "server_shutting_down", "server_error")
            assert int(r.headers["retry-after"]) >= 1
        assert len(backend.calls) == 1 and admission.inflight == 1
        assert not await admission.wait_idle(0.05)  # the stream still runs

        waiter = asyncio.create_task(admission.wait_idle(5))
        backend.release.set()
        assert await stream.finish() == "az"  # the in-flight stream ended normally
        assert await waiter and admission.inflight == 0
        assert backend.aborted == []
