"""KV-aware routing across a worker restart, as users run it (``pdserve serve``): a prefill worker that
holds a document is SIGKILLed and the supervisor restarts it under the same id; the router sees its new
epoch (or its removal, when it noticed the death first), forgets the blocks the dead process cached,
and routes the document by what the new process really holds. Greedy outputs stay those of the
offline engine throughout.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_elastic import AUTH, serve, stop

from pdserve import LLM, SamplingParams

pytestmark = pytest.mark.slow

BLOCK = 16  # test_elastic's worker arguments
PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def document(seed: int, num_tokens: int = 160) -> list[int]:
    return [(seed * 7919 + i * 31) % 200 + 20 for i in range(num_tokens)]


def complete(url: str, prompt: list[int]) -> dict[str, Any]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    reply = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH,
                       timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


def workers(url: str) -> dict[str, dict[str, Any]]:
    data = httpx.get(f"{url}/pdserve/workers", headers=AUTH, timeout=10).json()
    return {w["worker_id"]: w for w in data["workers"]}


def slots(url: str) -> dict[str, dict[str, Any]]:
    data = httpx.get(f"{url}/pdserve/workers?stats=false", headers=AUTH, timeout=10).json()
    return {w["worker_id"]: w for w in data["deployment"]["workers"]}


def wait(ok: Any, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_a_restarted_worker_is_known_by_its_epoch_and_its_dead_cache_is_forgotten(tmp_path: Path) -> None:
    offline = LLM("tiny", chunk_size=32, block_size=BLOCK, kv_cache_bytes=32 << 20)
    served = serve(tmp_path, "--prefill", "2", "--decode", "1", "--disagg-policy", "always",
                   "--trace-responses")
    url = served.url
    try:
        doc = document(3)
        prompt = [*doc, 1, 2, 3]
        expected = offline.generate([prompt], PARAMS)[0].text
        first = complete(url, prompt)
        assert first["choices"][0]["text"] == expected
        [routed] = [e for e in first["pdserve_trace"][0]["events"] if e["event"] == "routed"]
        home = routed["prefill_worker"]
        full_blocks = len(doc) // BLOCK
        wait(lambda: workers(url)[home]["cache"]["index_blocks"] >= full_blocks, "the events never arrived")
        old_pid = slots(url)[home]["pid"]

        os.kill(old_pid, signal.SIGKILL)
        wait(lambda: home not in workers(url) or slots(url)[home]["pid"] != old_pid, "not noticed")
        wait(lambda: slots(url)[home]["state"] == "ready" and slots(url)[home]["pid"] != old_pid
             and home in workers(url), "not restarted")
        # Same id, new epoch: the dead process's blocks are not attributed to the new one.
        assert workers(url)[home]["cache"]["index_blocks"] == 0
        time.sleep(5.5)  # past the speculative entries' lifetime
        again = complete(url, [*doc, 4, 5, 6])
        assert again["choices"][0]["text"] == offline.generate([[*doc, 4, 5, 6]], PARAMS)[0].text
        [routed] = [e for e in again["pdserve_trace"][0]["events"] if e["event"] == "routed"]
        assert routed["predicted_cached_tokens"] == 0  # nobody holds the document any more
        assert again["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0) == 0
    finally:
        assert stop(served) == 0
