"""KV-aware routing and conditional disaggregation, end to end through real processes.

* 3 prefill + 1 decode workers, ``kv_aware``, ``--disagg-policy always``:
  requests sharing a document go to the prefill worker that holds it (and
  report its cached tokens); a follow-up turn moves only the KV blocks the
  decode worker does not hold yet; greedy outputs equal offline generation.
* 1 prefill + 1 decode, ``round_robin``, ``--disagg-policy auto`` (the
  default): short prompts are prefilled on the decode worker with no KV moved,
  every decision is counted by reason, outputs equal offline generation.
* A worker whose block size differs from the router's is refused with a clear error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import launch

from pdserve import LLM, SamplingParams
from pdserve.launch.local import LocalLauncher

pytestmark = pytest.mark.slow

BLOCK = 16
PER_BLOCK_BYTES = 2 * 4 * BLOCK * 2 * 32 * 4  # K and V · layers · block · kv heads · head dim · fp32 (tiny)
PDSERVE = (sys.executable, "-m", "pdserve")
PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def offline() -> LLM:
    return LLM("tiny", chunk_size=32, block_size=BLOCK, kv_cache_bytes=64 << 20)


@pytest.fixture(scope="module")
def three_prefill() -> Iterator[LocalLauncher]:
    launcher = launch(
        "disaggregated",
        "shm",
        ("--trace-responses", "--disagg-policy", "always"),
        num_prefill=3,
        num_decode=1,
    )
    yield launcher
    launcher.stop()


@pytest.fixture(scope="module")
def conditional() -> Iterator[LocalLauncher]:
    launcher = launch(
        "disaggregated",
        "shm",
        ("--trace-responses", "--policy", "round_robin", "--disagg-policy", "auto"),
        num_prefill=1,
        num_decode=1,
    )
    yield launcher
    launcher.stop()


def complete(url: str, prompt: list[int], max_tokens: int = 8) -> dict[str, Any]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


def routed(reply: dict[str, Any]) -> dict[str, Any]:
    [event] = [e for e in reply["pdserve_trace"][0]["events"] if e["event"] == "routed"]
    return event


def workers(url: str) -> dict[str, dict[str, Any]]:
    data = httpx.get(f"{url}/pdserve/workers", timeout=10).json()
    return {w["worker_id"]: w for w in data["workers"]}


def wait_indexed(url: str, worker_id: str, num_blocks: int, timeout_s: float = 30.0) -> None:
    """Wait until the router's index holds at least ``num_blocks`` blocks of ``worker_id``."""
    deadline = time.monotonic() + timeout_s
    while workers(url)[worker_id]["cache"]["index_blocks"] < num_blocks:
        assert time.monotonic() < deadline, workers(url)[worker_id]["cache"]
        time.sleep(0.1)


def document(seed: int, num_tokens: int = 160) -> list[int]:
    return [(seed * 7919 + i * 31) % 200 + 20 for i in range(num_tokens)]


def test_shared_documents_land_where_they_are_cached(three_prefill: LocalLauncher, offline: LLM) -> None:
    url = three_prefill.url
    homes = {}
    for doc_id in range(3):
        doc = document(doc_id)
        first = complete(url, [*doc, 1, 2, 3])
        homes[doc_id] = routed(first)["prefill_worker"]
        wait_indexed(url, homes[doc_id], len(doc) // BLOCK)  # the worker's events arrived
    time.sleep(5.5)  # past the speculative entries' lifetime: only the events speak now
    for doc_id in range(3):
        doc = document(doc_id)
        for user in range(3):
            prompt = [*doc, 100 + user, 5, 6, 7]
            reply = complete(url, prompt)
            event = routed(reply)
            assert event["prefill_worker"] == homes[doc_id], (doc_id, user, event)
            assert event["reason"] == "forced_remote"
            assert event["predicted_cached_tokens"] == len(doc) // BLOCK * BLOCK
            # usage reports what the prefill worker's cache served
            assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == len(doc) // BLOCK * BLOCK
            want = offline.generate([prompt], PARAMS)[0].text
            assert reply["choices"][0]["text"] == want
    data = httpx.get(f"{url}/pdserve/workers", timeout=10).json()
    assert data["routing"]["policy"] == "kv_aware" and data["routing"]["decisions"]["forced_remote"] >= 12
    # The hit rate rides the workers' heartbeats (every few seconds): wait for the next one.
    deadline = time.monotonic() + 20.0
    for wid in set(homes.values()):
        while workers(url)[wid]["cache"]["prefix_hit_rate"] <= 0:
            assert time.monotonic() < deadline, workers(url)[wid]["cache"]
            time.sleep(0.2)


def test_follow_up_turn_moves_only_new_blocks(three_prefill: LocalLauncher, offline: LLM) -> None:
    url = three_prefill.url
    [decode_id] = [w for w, info in workers(url).items() if info["role"] == "decode"]
    turn1 = document(42, 100)
    out1 = offline.generate([turn1], PARAMS)[0].token_ids
    before = workers(url)[decode_id]["stats"]["kv_bytes_received"]
    complete(url, turn1)
    middle = workers(url)[decode_id]["stats"]["kv_bytes_received"]
    assert middle - before == -(-len(turn1) // BLOCK) * PER_BLOCK_BYTES  # a new conversation: all of it
    turn2 = [*turn1, *out1, 9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    reply = complete(url, turn2)
    assert reply["choices"][0]["text"] == offline.generate([turn2], PARAMS)[0].text
    after = workers(url)[decode_id]["stats"]["kv_bytes_received"]
    # The decode worker holds the full blocks of turn 1 and its reply
    # (the KV of the reply's last token was never computed).
    held = min((len(turn1) + len(out1) - 1) // BLOCK, (len(turn2) - 1) // BLOCK)
    assert after - middle == (-(-len(turn2) // BLOCK) - held) * PER_BLOCK_BYTES


def test_short_prompts_prefill_on_decode_without_moving_kv(conditional: LocalLauncher, offline: LLM) -> None:
    url = conditional.url
    ids = workers(url)
    [decode_id] = [w for w, info in ids.items() if info["role"] == "decode"]
    [prefill_id] = [w for w, info in ids.items() if info["role"] == "prefill"]
    before = {w: info["stats"] for w, info in ids.items()}
    prompts = [[20 + i, 30 + i, 40 + i, 50 + i, 60 + i] * (1 + i % 3) for i in range(6)]
    for prompt in prompts:
        reply = complete(url, prompt)
        event = routed(reply)
        assert event["prefill_worker"] is None and event["decode_worker"] == decode_id
        assert event["reason"] == "local_short", event
        assert reply["choices"][0]["text"] == offline.generate([prompt], PARAMS)[0].text
    after = {w: info["stats"] for w, info in workers(url).items()}
    assert after[decode_id]["kv_bytes_received"] == before[decode_id]["kv_bytes_received"]
    assert after[prefill_id]["kv_bytes_sent"] == before[prefill_id]["kv_bytes_sent"]
    assert after[prefill_id]["num_prompt_tokens_computed"] == before[prefill_id]["num_prompt_tokens_computed"]
    key = "num_prompt_tokens_computed"
    assert after[decode_id][key] - before[decode_id][key] == sum(len(p) for p in prompts)
    # The same prompt again is served from the decode worker's own cache, and usage says so.
    prompt = document(7, 40)
    complete(url, prompt)
    reply = complete(url, prompt)
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == (len(prompt) - 1) // BLOCK * BLOCK
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'pdserve_placements_total{reason="local_short"}' in metrics
    assert "pdserve_worker_prefix_cache_hit_rate{" in metrics
    status = subprocess.run(
        [sys.executable, "-m", "pdserve", "status", "--url", url, "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "routing: round_robin, disagg auto" in status and "local_short" in status


def test_worker_with_another_block_size_is_refused() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ready = os.path.join(tmp, "router.json")
        router = subprocess.Popen(
            [
                *PDSERVE,
                "router",
                "--model",
                "tiny",
                "--port",
                "0",
                "--control-port",
                "0",
                "--kv-block-size",
                "16",
                "--ready-file",
                ready,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(ready):
                assert router.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
            time.sleep(0.2)
            with open(ready) as f:
                endpoint = json.load(f)["control_endpoint"]
            worker = subprocess.run(
                [
                    *PDSERVE,
                    "worker",
                    "--role",
                    "mixed",
                    "--router",
                    endpoint,
                    "--model",
                    "tiny",
                    "--block-size",
                    "32",
                    "--kv-cache-mib",
                    "16",
                    "--threads",
                    "1",
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
        finally:
            router.terminate()
            router.wait(timeout=30)
    assert worker.returncode == 2
    assert "refused" in worker.stderr and "block size 32 differs from the router's 16" in worker.stderr


@pytest.mark.parametrize(
    ("policy", "disagg_policy"),
    [("least_loaded", "always"), ("least_loaded", "auto"), ("kv_aware", "never")],
)
def test_greedy_outputs_do_not_depend_on_the_policy(policy: str, disagg_policy: str, offline: LLM) -> None:
    """The policies this module's fixtures do not run give the offline engine's tokens, whichever
    worker computes the prompt (P then D over shm, or D alone)."""
    launcher = launch("disaggregated", "shm", ("--policy", policy, "--disagg-policy", disagg_policy),
                      num_prefill=2, num_decode=1)
    try:
        prompts = [[*document(seed, 40 + 30 * seed), 9] for seed in range(4)]
        for prompt in prompts:
            reply = complete(launcher.url, prompt)
            assert reply["choices"][0]["text"] == offline.generate([prompt], PARAMS)[0].text, (policy, prompt)
    finally:
        launcher.stop()
