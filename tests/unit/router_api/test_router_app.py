"""The router app as served: probes and /v1/models, uvicorn, client disconnects, the OpenAI SDK."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import MutableMapping
from typing import Any

import httpx
import pytest
from router_fakes import (
    MODEL,
    TOKENIZER,
    FakeBackend,
    chat,
    completion,
    serve,
    text_script,
    wait_until,
)

from pdserve.router.app import create_app

pytestmark = pytest.mark.anyio  # anyio's pytest plugin ships with anyio, a FastAPI dependency


# -- probes and models ------------------------------------------------------------------------


async def test_health_ready_and_models(client: httpx.AsyncClient, backend: FakeBackend) -> None:
    r = await client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert (await client.get("/ready")).status_code == 200
    backend.ready = False
    assert (await client.get("/ready")).status_code == 503
    assert (await client.get("/health")).status_code == 200
    backend.ready = True
    assert (await client.get("/ready")).status_code == 200
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == MODEL and card["object"] == "model" and isinstance(card["created"], int)


# -- through a real server --------------------------------------------------------------------



async def test_client_disconnect_aborts_under_uvicorn(backend: FakeBackend) -> None:
    backend.respond = lambda rid, p, sp: text_script("Hi", hang=True)
    server, task, url = await serve(backend)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            async with c.stream("POST", "/v1/completions", json=completion(stream=True)) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        break  # got a token; now hang up
            await wait_until(lambda: len(backend.aborted) == 1)
            assert backend.closed_early == backend.aborted

            with pytest.raises(httpx.ReadTimeout):
                await c.post("/v1/chat/completions", json=chat(), timeout=0.3)
            await wait_until(lambda: len(backend.aborted) == 2)
            assert backend.aborted == [rid for rid, _, _ in backend.calls]
    finally:
        server.should_exit = True
        await task


async def test_disconnect_noticed_on_asgi_2_4_servers(backend: FakeBackend) -> None:
    """ASGI ≥ 2.4 servers report a gone client only when a write fails; the stream must not wait for one."""
    backend.respond = lambda *_: text_script("Hi", hang=True)
    app = create_app(backend, TOKENIZER, served_model_name=MODEL)
    body = json.dumps(completion(stream=True)).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
        "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
    }
    got_token = asyncio.Event()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await got_token.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        if b"data: {" in message.get("body", b""):
            got_token.set()

    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    assert backend.aborted == [backend.calls[0][0]]


async def test_openai_sdk_against_uvicorn(backend: FakeBackend) -> None:
    openai = pytest.importorskip("openai")
    server, task, url = await serve(backend)
    try:
        sdk = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0)
        done = await sdk.completions.create(model=MODEL, prompt="Hi", max_tokens=11)
        assert done.choices[0].text == "Hello world" and done.usage.completion_tokens == 11
        stream = await sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello world"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 11
        with pytest.raises(openai.NotFoundError):
            await sdk.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        await sdk.close()
    finally:
        server.should_exit = True
        await task


async def test_router_app_does_not_import_torch() -> None:
    code = "import sys, pdserve.router.app; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
