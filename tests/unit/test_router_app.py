"""The OpenAI front end against a scripted in-memory backend and the byte-level tokenizer.

The byte tokenizer makes ids predictable: id = byte + 3, BOS = 1, EOS = 2.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn

from pdserve.request import TokenLogprobs
from pdserve.router.app import create_app
from pdserve.router.backend import BackendError, GenerationEvent
from pdserve.sampling_params import SamplingParams
from pdserve.tokenizer import load_tokenizer

pytestmark = pytest.mark.anyio  # anyio's pytest plugin ships with anyio, a FastAPI dependency

TOKENIZER = load_tokenizer("tiny")
MODEL = "tiny-served"
MAX_MODEL_LEN = 128


def ids(text: str) -> list[int]:
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


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
async def client(backend: FakeBackend) -> AsyncIterator[httpx.AsyncClient]:
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
    return {"model": MODEL, "prompt": "Hi", **kw}


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **kw}


# -- completions -----------------------------------------------------------------------------


async def test_completion_non_streaming(client: httpx.AsyncClient, backend: FakeBackend) -> None:
    r = await client.post("/v1/completions", json=completion(temperature=0.5, user="u", some_extra=[1]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == MODEL and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["text"] == "Hello world"
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    prompt_ids = TOKENIZER.encode("Hi")
    assert body["usage"] == {
        "prompt_tokens": len(prompt_ids), "completion_tokens": len("Hello world"),
        "total_tokens": len(prompt_ids) + len("Hello world"),
        "prompt_tokens_details": {"cached_tokens": 3},
    }
    [(_, sent_ids, params)] = backend.calls
    assert sent_ids == prompt_ids
    assert params.max_tokens == 16 and params.temperature == 0.5 and params.stop == []
    assert backend.aborted == []  # finished by itself: nothing to abort


async def test_completion_streaming(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json=completion(stream=True))
    assert r.status_code == 200
    events = sse_events(r)
    assert all(e["object"] == "text_completion" and e["id"].startswith("cmpl-") for e in events)
    assert len({e["id"] for e in events}) == 1
    assert all("usage" not in e for e in events)  # only with include_usage
    assert "".join(e["choices"][0]["text"] for e in events) == "Hello world"
    assert [e["choices"][0]["finish_reason"] for e in events][-1] == "length"
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])


async def test_streaming_include_usage(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/completions", json=completion(stream=True, stream_options={"include_usage": True})
    )
    events = sse_events(r)
    *chunks, last = events
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == len("Hello world")
    assert last["usage"]["prompt_tokens"] == len(TOKENIZER.encode("Hi"))
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + len("Hello world")
    assert chunks and all(c["usage"] is None for c in chunks)


async def test_token_id_prompts_and_multiple_prompts(client: httpx.AsyncClient, backend: FakeBackend) -> None:
    r = await client.post("/v1/completions", json=completion(prompt=[5, 6, 7]))
    assert r.status_code == 200
    assert backend.calls[-1][1] == [5, 6, 7]
    r = await client.post("/v1/completions", json=completion(prompt=[[5, 6], [7]]))
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    assert [c[1] for c in backend.calls[-2:]] == [[5, 6], [7]]
    assert r.json()["usage"]["prompt_tokens"] == 3


def echo_seed(rid: str, prompt: list[int], params: SamplingParams) -> Script:
    """Answers with the prompt's last character and the seed, so each choice is recognisable."""
    return text_script(f"{TOKENIZER.decode(prompt[-1:])}{params.seed}")


async def test_multiple_prompts_with_n(client: httpx.AsyncClient, backend: FakeBackend) -> None:
    backend.respond = echo_seed
    r = await client.post("/v1/completions", json=completion(prompt=["a", "b"], n=2, seed=10))
    assert r.status_code == 200, r.text
    body = r.json()
    got = [(c["index"], c["text"]) for c in body["choices"]]
    assert got == [(0, "a10"), (1, "a11"), (2, "b10"), (3, "b11")]
    assert len({rid for rid, _, _ in backend.calls}) == 4
    # prompts counted once each, cache hits of each prompt's first sample only
    assert body["usage"]["prompt_tokens"] == 2 * 2
    assert body["usage"]["completion_tokens"] == 4 * 3
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 2 * 3

    r = await client.post("/v1/completions", json=completion(prompt=["a", "b"], n=2, seed=10, stream=True))
    texts: dict[int, str] = {}
    for event in sse_events(r):
        [choice] = event["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {0: "a10", 1: "a11", 2: "b10", 3: "b11"}


async def test_completion_logprobs(client: httpx.AsyncClient, backend: FakeBackend) -> None:
    r = await client.post("/v1/completions", json=completion(logprobs=2))
    assert r.status_code == 200
    assert backend.calls[0][2].logprobs == 2
    lp = r.json()["choices"][0]["logprobs"]
    n = len("Hello world")
    assert lp["tokens"] == list("Hello world")
    assert lp["token_logprobs"] == [-0.25] * n
    assert lp["text_offset"] == list(range(n))
    first_top = lp["top_logprobs"][0]
    assert len(lp["top_logprobs"]) == n and first_top == {"H": -0.25, "I": -1.5}  # top 2 of 3, best first


# -- chat -------------------------------------------------------------------------------------


async def test_chat_non_streaming(client: httpx.AsyncClient, backend: FakeBackend) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
    ]
    r = await client.post("/v1/chat/completions", json=chat(messages=messages))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == MODEL
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Hello world"}
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    expected = TOKENIZER.encode("<|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\n")
    [(_, sent_ids, params)] = backend.calls
    assert sent_ids == expected and sent_ids.count(TOKENIZER.bos_token_id) == 1  # template + exactly one BOS
    assert params.max_tokens == MAX_MODEL_LEN - len(expected)  # chat default: the room left
    assert body["usage"]["prompt_tokens"] == len(expected)
    assert body["usage"]["completion_tokens"] == len("Hello world")


async def test_chat_max_completion_tokens_wins(client: httpx.AsyncClient, backend: FakeBackend) -> None:
    r = await client.post("/v1/chat/completions", json=chat(max_tokens=7, max_completion_tokens=5))
    assert r.status_code == 200
    assert backend.calls[0][2].max_tokens == 5


async def test_chat_streaming(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat(stream=True))
    events = sse_events(r)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    first = events[0]["choices"][0]
    assert first["delta"]["role"] == "assistant" and first["finish_reason"] is None
    assert all("role" not in e["choices"][0]["delta"] for e in events[1:])
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "Hello world"
    assert events[-1]["choices"][0]["finish_reason"] == "length"


async def test_chat_logprobs(client: httpx.AsyncClient, backend: FakeBackend) -> None:
    backend.respond = lambda rid, p, sp: Script([ids("é"), ids("a")], finish_reason="stop", stop_reason=None)
    r = await client.post("/v1/chat/completions", json=chat(logprobs=True, top_logprobs=2))
    assert r.status_code == 200, r.text
    assert backend.calls[0][2].logprobs == 2
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["<0xC3>", "<0xA9>", "a"]
    assert [c["bytes"] for c in content] == [[0xC3], [0xA9], [ord("a")]]
    assert r.json()["choices"][0]["message"]["content"] == "éa"
    top = content[2]["top_logprobs"]
    assert top == [
        {"token": "a", "logprob": -0.25, "bytes": [ord("a")]},
        {"token": "b", "logprob": -1.5, "bytes": [ord("b")]},
    ]
    # without logprobs: none asked of the backend, none returned
    r = await client.post("/v1/chat/completions", json=chat())
    assert backend.calls[-1][2].logprobs is None and r.json()["choices"][0]["logprobs"] is None

    r = await client.post("/v1/chat/completions", json=chat(logprobs=True, stream=True))
    streamed = [c for e in sse_events(r) for c in (e["choices"][0]["logprobs"] or {}).get("content", [])]
    assert [c["token"] for c in streamed] == ["<0xC3>", "<0xA9>", "a"]
    assert all(c["top_logprobs"] == [] for c in streamed)  # top_logprobs defaults to 0


# -- stop strings -----------------------------------------------------------------------------


async def test_stop_string_split_across_tokens_streaming(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    # one byte per event and then it would go on forever: the app must end it and abort
    backend.respond = lambda rid, p, sp: text_script("Hello STOP and more", hang=True)
    r = await asyncio.wait_for(
        client.post("/v1/completions", json=completion(stream=True, stop=["STOP"])), timeout=5
    )
    events = sse_events(r)
    texts = [e["choices"][0]["text"] for e in events]
    assert "".join(texts) == "Hello "
    assert not any("S" in t for t in texts)  # the stop string's prefix never leaked out
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["choices"][0]["stop_reason"] == "STOP"
    [(rid, _, params)] = backend.calls
    assert params.stop == ["STOP"]
    assert rid in backend.aborted
    assert backend.closed_early == [rid]  # the backend's stream was closed too


async def test_stop_string_non_streaming_and_chat(client: httpx.AsyncClient, backend: FakeBackend) -> None:
    backend.respond = lambda rid, p, sp: Script([ids("Hel"), ids("lo\nBy"), ids("e")], hang=True)
    r = await asyncio.wait_for(client.post("/v1/chat/completions", json=chat(stop="\nBy")), timeout=5)
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "Hello" and choice["finish_reason"] == "stop"
    assert backend.aborted == [backend.calls[0][0]]
    # tokens up to the one that completed the stop string are counted, later ones are not sent
    assert r.json()["usage"]["completion_tokens"] == len("Hello\nBy")


async def test_held_back_text_is_flushed_at_the_end(client: httpx.AsyncClient, backend: FakeBackend) -> None:
    backend.respond = lambda rid, p, sp: text_script("Hello ST")
    r = await client.post("/v1/completions", json=completion(stream=True, stop=["STOP"]))
    events = sse_events(r)
    assert "".join(e["choices"][0]["text"] for e in events) == "Hello ST"
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert backend.aborted == []


async def test_stop_token_ends_with_stop_reason(client: httpx.AsyncClient, backend: FakeBackend) -> None:
    backend.respond = lambda rid, p, sp: Script([ids("ok"), [2]], finish_reason="stop", stop_reason=2)
    r = await client.post("/v1/completions", json=completion(stop_token_ids=[2], top_k=5, min_p=0.1,
                                                              min_tokens=1, ignore_eos=True))
    choice = r.json()["choices"][0]
    assert choice["text"] == "ok" and choice["finish_reason"] == "stop" and choice["stop_reason"] == 2
    params = backend.calls[0][2]
    assert (params.stop_token_ids, params.top_k, params.min_p, params.min_tokens, params.ignore_eos) == (
        [2], 5, 0.1, 1, True
    )


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


async def serve(backend: FakeBackend) -> tuple[uvicorn.Server, asyncio.Task[None], str]:
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
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


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
