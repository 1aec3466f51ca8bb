"""Stop strings and stop tokens: text cut at the stop string, held-back text flushed, the backend aborted."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from router_fakes import (
    FakeBackend,
    Script,
    chat,
    completion,
    ids,
    sse_events,
    text_script,
)

pytestmark = pytest.mark.anyio  # anyio's pytest plugin ships with anyio, a FastAPI dependency


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
