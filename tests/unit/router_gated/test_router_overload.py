"""Overload protection: past ``max_inflight`` a fast 429 before any work, and every slot comes back.

Every test that admits requests ends with nothing left in flight.

Shared fakes: tests/router_gated.py (a backend that holds generations open until released).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from router_gated import (
    AUTH,
    KEY,
    CountingTokenizer,
    GatedBackend,
    OpenStream,
    assert_error,
    chat,
    completion,
    make_app,
    served,
    wait_until,
)
from starlette.types import Message, Receive, Scope, Send

from pdserve.router.admission import Admission
from pdserve.router.backend import BackendError

pytestmark = pytest.mark.anyio


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
