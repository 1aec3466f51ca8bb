"""Request traces and the TTFT breakdown, end to end (routers started with ``--trace-responses``)."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest

from pdserve.launch.local import LocalLauncher

pytestmark = pytest.mark.slow

PARTS = ("queue_s", "prefill_s", "transfer_s", "delivery_s")


def stream_with_client_ttft(url: str, body: dict[str, Any]) -> tuple[float, list[dict[str, Any]]]:
    """Stream a completion; the client's own TTFT (send → first token's chunk) and every chunk.

    ``logprobs: 0`` makes every token its own chunk, even one whose text the
    router holds back (half a UTF-8 character).
    """
    chunks: list[dict[str, Any]] = []
    ttft = None
    start = time.perf_counter()
    body = {**body, "stream": True, "logprobs": 0}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choices = chunk["choices"]
            if ttft is None and choices and choices[0]["logprobs"] and choices[0]["logprobs"]["tokens"]:
                ttft = time.perf_counter() - start
            chunks.append(chunk)
    assert ttft is not None
    return ttft, chunks


def event_times(trace: dict[str, Any]) -> dict[str, float]:
    names = [e["event"] for e in trace["events"]]
    assert len(names) == len(set(names)), f"an event was recorded twice: {names}"
    return {e["event"]: e["t_s"] for e in trace["events"]}


def check_breakdown(trace: dict[str, Any], client_ttft_s: float) -> dict[str, float]:
    """The parts are non-negative, add up to the router's TTFT, which lies within the client's."""
    b = trace["ttft_breakdown"]
    assert b["exact"] is True
    assert all(b[part] >= 0 for part in PARTS), b
    assert sum(b[part] for part in PARTS) == pytest.approx(trace["ttft_s"], abs=1e-5)
    assert b["queue_s"] == pytest.approx(b["router_queue_s"] + b["worker_queue_s"], abs=1e-5)
    assert b["delivery_s"] == pytest.approx(b["network_s"] + b["router_delivery_s"], abs=1e-5)
    # The router's TTFT is the client's less the HTTP hops on loopback.
    assert trace["ttft_s"] <= client_ttft_s
    assert client_ttft_s - trace["ttft_s"] < 0.1, (client_ttft_s, trace["ttft_s"])
    assert b["prefill_s"] > 0
    return b


def test_disaggregated_trace_adds_up_and_orders_its_events(disagg_shm: LocalLauncher) -> None:
    body = {"model": "tiny", "prompt": [3 + i % 250 for i in range(400)], "max_tokens": 6, "ignore_eos": True}
    client_ttft, chunks = stream_with_client_ttft(disagg_shm.url, body)
    carrying = [c for c in chunks if "pdserve_trace" in c]
    assert len(carrying) == 1 and carrying[0]["choices"][0]["finish_reason"] == "length"
    (trace,) = carrying[0]["pdserve_trace"]
    assert trace["index"] == 0 and trace["outcome"] == "finished" and trace["attempts"] == 1
    assert trace["num_tokens"] == 6
    b = check_breakdown(trace, client_ttft)
    assert b["transfer_s"] > 0  # at least the pusher's bookkeeping between the layers
    t = event_times(trace)
    order = ["arrived", "routed", "prefill_start", "prefill_end", "first_token", "first_token_delivered",
             "finished"]
    assert [t[name] for name in order] == sorted(t[name] for name in order)
    # The push starts during the prefill when the decode worker's blocks are known by then, else after.
    assert t["prefill_start"] <= t["kv_transfer_start"] <= t["kv_transfer_end"]
    assert t["routed"] <= t["kv_reserved"] <= t["kv_transfer_end"]
    reserved = next(e for e in trace["events"] if e["event"] == "kv_reserved")
    assert reserved["blocks"] == 26  # the 400 prompt tokens and the first output token
    assert t["first_token_delivered"] == pytest.approx(trace["ttft_s"], abs=1e-5)
    assert t["kv_transfer_end"] > t["first_token"] - 1e-3
    kv_end = next(e for e in trace["events"] if e["event"] == "kv_transfer_end")
    assert kv_end["bytes"] == 25 * (2 * 4 * 16 * 2 * 32 * 4)  # 400 token ids (no BOS added): 25 blocks
    routed = next(e for e in trace["events"] if e["event"] == "routed")
    assert routed["prefill_worker"].startswith("prefill-") and routed["decode_worker"].startswith("decode-")
    # The router keeps it for GET /pdserve/traces too.
    recent = httpx.get(f"{disagg_shm.url}/pdserve/traces", params={"limit": 20}, timeout=10).json()["traces"]
    assert trace["request_id"] in [r["request_id"] for r in recent]


def test_aggregated_trace_has_no_transfer(aggregated: LocalLauncher) -> None:
    body = {"model": "tiny", "prompt": [3 + i % 250 for i in range(200)], "max_tokens": 4, "ignore_eos": True}
    client_ttft, chunks = stream_with_client_ttft(aggregated.url, body)
    (trace,) = next(c for c in chunks if "pdserve_trace" in c)["pdserve_trace"]
    b = check_breakdown(trace, client_ttft)
    assert b["transfer_s"] == 0
    names = {e["event"] for e in trace["events"]}
    assert "kv_transfer_start" not in names and "kv_transfer_end" not in names


def test_openai_client_reads_the_traces_of_every_choice(disagg_shm: LocalLauncher) -> None:
    client = openai.OpenAI(base_url=f"{disagg_shm.url}/v1", api_key="unused", max_retries=0)
    completion = client.completions.create(model="tiny", prompt="trace me", max_tokens=3, n=2, seed=1)
    traces = (completion.model_extra or {})["pdserve_trace"]
    assert sorted(t["index"] for t in traces) == [0, 1]
    for trace in traces:
        assert trace["outcome"] == "finished" and trace["num_tokens"] == 3
        parts = sum(trace["ttft_breakdown"][p] for p in PARTS)
        assert parts == pytest.approx(trace["ttft_s"], abs=1e-5)


def test_responses_carry_no_trace_unless_asked(disagg_tcp: LocalLauncher) -> None:
    body = {"model": "tiny", "prompt": "quiet", "max_tokens": 2}
    reply = httpx.post(f"{disagg_tcp.url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200 and "pdserve_trace" not in reply.json()
    # ...but the router still traces it.
    (last,) = httpx.get(f"{disagg_tcp.url}/pdserve/traces", params={"limit": 1}, timeout=10).json()["traces"]
    assert last["outcome"] == "finished" and last["ttft_breakdown"]["exact"] is True
