"""Bad requests are OpenAI-shaped 4xx errors naming the parameter, and never reach the backend."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
from router_fakes import (
    MAX_MODEL_LEN,
    MODEL,
    FakeBackend,
    assert_error,
    chat,
    completion,
)

pytestmark = pytest.mark.anyio  # anyio's pytest plugin ships with anyio, a FastAPI dependency


# -- validation -------------------------------------------------------------------------------

BAD_REQUESTS = [
    # (path, body, status, param, code)
    ("/v1/completions", completion(temperature=-1), 400, "temperature", None),
    ("/v1/completions", completion(temperature="hot"), 400, "temperature", None),
    ("/v1/completions", completion(temperature=True), 400, "temperature", None),
    ("/v1/completions", completion(top_p=0), 400, "top_p", None),
    ("/v1/completions", completion(top_k=-2), 400, "top_k", None),
    ("/v1/completions", completion(max_tokens=0), 400, "max_tokens", None),
    ("/v1/completions", completion(max_tokens="5"), 400, "max_tokens", None),
    ("/v1/completions", completion(min_tokens=20, max_tokens=10), 400, "min_tokens", None),
    ("/v1/completions", completion(logprobs=21), 400, "logprobs", None),
    ("/v1/completions", completion(n=0), 400, "n", None),
    ("/v1/completions", completion(stop=[""]), 400, "stop", None),
    ("/v1/completions", completion(stop=5), 400, "stop", None),
    ("/v1/completions", completion(seed=2**64), 400, "seed", None),
    ("/v1/completions", completion(presence_penalty=0.5), 400, "presence_penalty", None),
    ("/v1/completions", completion(echo=True), 400, "echo", None),
    ("/v1/completions", {"model": MODEL}, 400, "prompt", None),
    ("/v1/completions", completion(prompt=""), 400, "prompt", None),
    ("/v1/completions", completion(prompt=[]), 400, "prompt", None),
    ("/v1/completions", completion(prompt=[[]]), 400, "prompt", None),
    ("/v1/completions", completion(prompt=["a", ""]), 400, "prompt", None),
    ("/v1/completions", completion(prompt=[1, "a"]), 400, "prompt", None),
    ("/v1/completions", completion(prompt=[5, 259]), 400, "prompt", None),
    ("/v1/completions", completion(prompt=[[5], [-1]]), 400, "prompt", None),
    ("/v1/completions", completion(model="gpt-4"), 404, "model", "model_not_found"),
    ("/v1/chat/completions", chat(messages=[]), 400, "messages", None),
    ("/v1/chat/completions", chat(messages="hi"), 400, "messages", None),
    ("/v1/chat/completions", chat(messages=[{"content": "no role"}]), 400, "messages", None),
    ("/v1/chat/completions", chat(messages=[{"role": "wizard", "content": "Hi"}]), 400, "messages", None),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "a"}, {"role": "bot"}]),
     400, "messages", None),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
     400, "messages", None),
    ("/v1/chat/completions", chat(max_completion_tokens=0), 400, "max_completion_tokens", None),
    ("/v1/chat/completions", chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", None),
    ("/v1/chat/completions", chat(top_logprobs=2), 400, "top_logprobs", None),
    ("/v1/chat/completions", chat(model="other"), 404, "model", "model_not_found"),
    ("/v1/chat/completions", chat(tools=[{"type": "function"}]), 400, "tools", None),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), BAD_REQUESTS)
async def test_invalid_requests(
    client: httpx.AsyncClient, backend: FakeBackend, path: str, body: dict, status: int,
    param: str | None, code: str | None,
) -> None:
    r = await client.post(path, json=body)
    error = assert_error(r, status, param, code)
    assert error["type"] == "invalid_request_error"
    assert backend.calls == []  # rejected before anything reached the backend


async def test_unknown_chat_role_is_named(client: httpx.AsyncClient, backend: FakeBackend) -> None:
    r = await client.post("/v1/chat/completions", json=chat(messages=[{"role": "wizard", "content": "Hi"}]))
    assert "'wizard'" in assert_error(r, 400, "messages")["message"]
    assert backend.calls == []
    roles = ["system", "developer", "user", "assistant", "tool", "user"]
    messages = [{"role": role, "content": "a"} for role in roles]
    r = await client.post("/v1/chat/completions", json=chat(messages=messages))
    assert r.status_code == 200, r.text


async def test_context_length_exceeded(client: httpx.AsyncClient, backend: FakeBackend) -> None:
    prompt = "x" * 100  # 101 tokens with BOS
    r = await client.post("/v1/completions", json=completion(prompt=prompt, max_tokens=28))
    error = assert_error(r, 400, "max_tokens", "context_length_exceeded")
    assert all(str(n) in error["message"] for n in (MAX_MODEL_LEN, 101, 28, 129))
    r = await client.post("/v1/completions", json=completion(prompt=prompt, max_tokens=27))
    assert r.status_code == 200  # exactly fits
    long_messages = [{"role": "user", "content": "y" * MAX_MODEL_LEN}]
    r = await client.post("/v1/chat/completions", json=chat(messages=long_messages))
    error = assert_error(r, 400, "messages", "context_length_exceeded")
    assert str(MAX_MODEL_LEN) in error["message"]
    assert len(backend.calls) == 1


async def test_malformed_bodies(client: httpx.AsyncClient, backend: FakeBackend) -> None:
    headers = {"content-type": "application/json"}
    r = await client.post("/v1/completions", content=b'{"prompt": "a"', headers=headers)
    assert "JSON" in assert_error(r, 400)["message"]
    r = await client.post("/v1/completions", content=b"[1, 2]", headers=headers)
    assert_error(r, 400)
    r = await client.post("/v1/chat/completions", content=b"\xff\xfe", headers=headers)
    assert_error(r, 400)
    text_plain = {"content-type": "text/plain"}
    r = await client.post("/v1/completions", content=json.dumps(completion()), headers=text_plain)
    assert "Content-Type" in assert_error(r, 400)["message"]
    r = await client.post("/v1/completions", json=completion(prompt="x" * 5000))
    assert_error(r, 413)

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds while reading
        yield b'{"prompt": "'
        for _ in range(5):
            yield b"x" * 1000

    r = await client.post("/v1/completions", content=chunked(), headers=headers)
    assert "content-length" not in r.request.headers
    assert_error(r, 413)
    assert backend.calls == []


async def test_unknown_routes_and_methods(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v1/nothing"), 404)
    assert_error(await client.post("/v1/embeddings", json={}), 404)
    assert_error(await client.get("/v1/completions"), 405)
