"""The OpenAI front end's completions and chat completions, streamed and not, against a scripted backend.

Shared fakes: tests/router_fakes.py (the byte tokenizer makes ids predictable: id = byte + 3).
"""

from __future__ import annotations

import httpx
import pytest
from router_fakes import (
    MAX_MODEL_LEN,
    MODEL,
    TOKENIZER,
    FakeBackend,
    Script,
    chat,
    completion,
    ids,
    sse_events,
    text_script,
)

from pdserve.sampling_params import SamplingParams

pytestmark = pytest.mark.anyio  # anyio's pytest plugin ships with anyio, a FastAPI dependency


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
