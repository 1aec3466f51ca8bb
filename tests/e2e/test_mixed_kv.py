"""Mixed workers on both sides of KV hand-offs, through ``pdserve serve`` as users start it.

One deployment, ``--prefill 1 --decode 1 --mixed 1 --disagg-policy always``, is
rescaled so that each kind of placement is the only one possible (the
supervisor flips workers between roles, same processes):

1. prefill + mixed: every request is computed on P and decoded on M (P→M);
2. mixed + decode: computed on M, decoded on D (M→D);
3. two mixed workers: each computes and decodes its own requests, even under
   ``always`` (mixed workers never hand KV to each other);
4. one mixed worker: an aggregated deployment, every request local on M.

The greedy outputs of every phase equal the aggregated phase's on the same
prompts, and the workers' KV counters show the bytes that moved into and out
of the mixed workers; a client that hangs up mid-stream leaves no KV held
anywhere.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from test_elastic import AUTH, Served, at_shape, serve, stop
from test_serve_cli import alive, children_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = serve(tmp_path_factory.mktemp("mixed-kv"), "--prefill", "1", "--decode", "1", "--mixed", "1",
              "--disagg-policy", "always", "--trace-responses")
    yield s
    stop(s)


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 200 + 20 for i in range(n)]


def complete(served: Served, tokens: list[int]) -> tuple[str, dict[str, Any]]:
    """A greedy completion: its text and the trace's ``routed`` event."""
    body = {"model": "tiny", "prompt": tokens, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    reply = httpx.post(f"{served.url}/v1/completions", json=body, headers=AUTH, timeout=120)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    [routed] = [e for e in data["pdserve_trace"][0]["events"] if e["event"] == "routed"]
    return data["choices"][0]["text"], routed


def workers(served: Served) -> dict[str, dict[str, Any]]:
    data = httpx.get(f"{served.url}/pdserve/workers", headers=AUTH, timeout=30).json()
    served.pids |= {w["pid"] for w in data["workers"] if w.get("pid")}
    return {w["worker_id"]: w for w in data["workers"]}


def kv_bytes(served: Served) -> dict[str, tuple[int, int]]:
    """(sent, received) KV bytes of every worker (counted since its last role change)."""
    return {wid: (w["stats"]["kv_bytes_sent"], w["stats"]["kv_bytes_received"])
            for wid, w in workers(served).items()}


def abandon(served: Served, tokens: list[int]) -> None:
    """Stream a long completion and hang up after its first tokens (the router aborts it everywhere)."""
    body = {"model": "tiny", "prompt": tokens, "max_tokens": 2000, "temperature": 0, "ignore_eos": True,
            "stream": True}
    aborted = aborted_requests(served)
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200
        for i, _ in enumerate(r.iter_lines()):
            if i >= 4:
                break
    deadline = time.monotonic() + 30
    while aborted_requests(served) == aborted:  # it was aborted, not finished
        assert time.monotonic() < deadline, "the abandoned request was never aborted"
        time.sleep(0.1)


def aborted_requests(served: Served) -> float:
    text = httpx.get(f"{served.url}/metrics", headers=AUTH, timeout=10).text
    name = 'pdserve_requests_total{outcome="aborted"}'
    lines = [line for line in text.splitlines() if line.startswith(name)]
    return float(lines[0].split()[-1]) if lines else 0.0


def wait_idle(served: Served, timeout_s: float = 60.0) -> None:
    """Until no worker runs, waits for, or holds a request and every KV block is free again."""
    deadline = time.monotonic() + timeout_s
    while True:
        loads = {wid: w["stats"]["load"] for wid, w in workers(served).items()}
        counts = ("num_running", "num_waiting", "num_waiting_for_kv", "num_held")
        busy = {wid: load for wid, load in loads.items()
                if any(load[c] for c in counts) or load["num_free_blocks"] != load["num_total_blocks"]}
        if not busy:
            return
        assert time.monotonic() < deadline, busy
        time.sleep(0.2)


def rescale(served: Served, **shape: int) -> dict[str, str]:
    """Set the pools to ``shape``, wait until they are there; worker id → role."""
    reply = httpx.post(f"{served.url}/pdserve/scale", json=shape, headers=AUTH, timeout=10)
    assert reply.status_code == 200, reply.text
    targets = reply.json()["targets"]
    at_shape(served, **targets)
    return {wid: w["role"] for wid, w in workers(served).items()}


PHASES = {  # prompts of each remote phase: long enough for several blocks, distinct per phase
    "P→M": [prompt(1, 60), prompt(2, 37)],
    "M→D": [prompt(3, 50), prompt(4, 81)],
    "M+M'": [prompt(5, 44), prompt(6, 70)],
}


def test_each_kind_of_placement_with_a_mixed_worker(served: Served) -> None:
    texts: dict[tuple[int, ...], str] = {}

    def run(phase: str, roles: dict[str, str], want: tuple[str, str]) -> list[tuple[str, str]]:
        pairs = []
        for tokens in PHASES[phase]:
            text, routed = complete(served, tokens)
            pw, dw = routed["prefill_worker"], routed["decode_worker"]
            assert (roles.get(pw), roles.get(dw)) == want and pw != dw, (phase, routed, roles)
            assert routed["reason"] == "forced_remote"
            texts[tuple(tokens)] = text
            pairs.append((pw, dw))
        return pairs

    roles = rescale(served, prefill=1, decode=0, mixed=1)
    before = kv_bytes(served)
    [(p, m), _] = run("P→M", roles, ("prefill", "mixed"))
    after = kv_bytes(served)
    assert after[m][1] > before[m][1] and after[p][0] > before[p][0]  # KV moved into the mixed worker
    abandon(served, prompt(7, 90))  # a client that hangs up: both sides free the request's KV
    wait_idle(served)

    roles = rescale(served, prefill=0, decode=1, mixed=1)
    before = kv_bytes(served)
    [(m, d), _] = run("M→D", roles, ("mixed", "decode"))
    after = kv_bytes(served)
    assert after[m][0] > before[m][0] and after[d][1] > before[d][1]  # KV moved out of the mixed worker
    abandon(served, prompt(8, 90))
    wait_idle(served)

    roles = rescale(served, prefill=0, decode=0, mixed=2)
    before = kv_bytes(served)
    for tokens in PHASES["M+M'"]:
        text, routed = complete(served, tokens)
        assert routed["prefill_worker"] is None and routed["reason"] == "aggregated", routed
        texts[tuple(tokens)] = text
    assert kv_bytes(served) == before  # nothing moved between the two mixed workers

    # One mixed worker: an aggregated deployment; the same prompts give the same text.
    roles = rescale(served, prefill=0, decode=0, mixed=1)
    [alone] = roles
    before = kv_bytes(served)
    for tokens, want in texts.items():
        text, routed = complete(served, list(tokens))
        assert routed["prefill_worker"] is None and routed["decode_worker"] == alone
        assert routed["reason"] == "aggregated"
        assert text == want, routed
    assert kv_bytes(served)[alone] == before[alone]  # nothing moved
    decisions = httpx.get(f"{served.url}/pdserve/workers", headers=AUTH, timeout=30).json()["routing"]
    assert decisions["decisions"]["forced_remote"] >= 4 and decisions["decisions"]["aggregated"] >= 8


def test_shutdown_leaves_no_process_or_segment(served: Served) -> None:
    """Mixed workers now own a shared-memory cache: each live one holds exactly one segment (flips
    unlinked their old ones), and none is left once the deployment stops."""
    pids = {w["pid"] for w in workers(served).values()}

    def segments(pid: int) -> list[str]:
        return [n for n in os.listdir("/dev/shm") if n.startswith(f"pdserve-kv-{pid}-")]

    assert pids and all(len(segments(pid)) == 1 for pid in pids)
    children = children_of(served.proc.pid)
    assert stop(served) == 0
    deadline = time.monotonic() + 15
    while any(alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [c for c in children if alive(c)], "processes left behind"
    assert [n for pid in served.pids | pids for n in segments(pid)] == []
