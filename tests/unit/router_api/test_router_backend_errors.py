"""Backend failures become HTTP errors before a stream starts, and an error event then [DONE] after."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from router_fakes import (
    FakeBackend,
    Script,
    assert_error,
    chat,
    completion,
    ids,
    sse_events,
    text_script,
)

from pdserve.router.backend import BackendError
from pdserve.sampling_params import SamplingParams

pytestmark = pytest.mark.anyio  # anyio's pytest plugin ships with anyio, a FastAPI dependency


# -- backend errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_backend_rejection_is_an_http_error(
    client: httpx.AsyncClient, backend: FakeBackend, stream: bool
) -> None:
    backend.respond = lambda rid, p, sp: Script([], error_before=BackendError("overloaded", 429, "busy", 1.5))
    r = await client.post("/v1/completions", json=completion(stream=stream))
    error = assert_error(r, 429, None, "busy")
    assert error["type"] == "rate_limit_error" and error["message"] == "overloaded"
    assert r.headers["retry-after"] == "2"

    backend.respond = lambda rid, p, sp: Script([], error_before=BackendError("no workers", 503))
    r = await client.post("/v1/chat/completions", json=chat(stream=stream))
    assert assert_error(r, 503)["type"] == "server_error"
    assert "retry-after" not in r.headers


async def test_error_mid_stream_is_an_event_then_done(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    backend.respond = lambda rid, p, sp: Script([ids("He"), ids("l")], error=BackendError("worker lost", 503))
    r = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert r.status_code == 200
    *chunks, last = sse_events(r)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hel"
    assert last == {"error": {"message": "worker lost", "type": "server_error", "param": None, "code": None}}
    assert backend.aborted == [backend.calls[0][0]]

    r = await client.post("/v1/chat/completions", json=chat())  # the same without streaming
    assert_error(r, 503)


async def test_error_in_one_of_n_aborts_the_others(client: httpx.AsyncClient, backend: FakeBackend) -> None:
    def respond(rid: str, p: list[int], sp: SamplingParams) -> Script:
        if rid.endswith("-1"):
            return Script([ids("x")], error=BackendError("worker lost", 503))
        return text_script("slow", hang=True)

    backend.respond = respond
    r = await asyncio.wait_for(client.post("/v1/completions", json=completion(n=2)), timeout=5)
    assert_error(r, 503)
    assert sorted(backend.aborted) == sorted(rid for rid, _, _ in backend.calls)


async def test_unexpected_exception_is_a_generic_500(
    client: httpx.AsyncClient, backend: FakeBackend, caplog: pytest.LogCaptureFixture
) -> None:
    backend.respond = lambda rid, p, sp: Script([], error_before=RuntimeError("internal detail"))
    with caplog.at_level(logging.INFO):
        r = await client.post("/v1/completions", json=completion(prompt="SECRET-PROMPT"))
        error = assert_error(r, 500)
        r = await client.post("/v1/completions", json=completion(stream=True))
        assert_error(r, 500)
    assert error["type"] == "server_error" and "internal detail" not in error["message"]
    assert any(rec.levelno >= logging.ERROR for rec in caplog.records)  # it was logged
    assert not any("SECRET-PROMPT" in rec.getMessage() for rec in caplog.records)


async def test_stream_that_ends_without_finishing_is_an_error(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    backend.respond = lambda *_: Script([ids("a")], unfinished=True)
    r = await client.post("/v1/completions", json=completion(stream=True))
    assert sse_events(r)[-1]["error"]["type"] == "server_error"
    assert len(backend.aborted) == 1
