"""A supervised deployment as users run it (``pdserve serve``, ``pdserve scale``): ready means ready,
killed workers are replaced while streams go on, pools scale up, flip roles and scale down under load
with no failed request, bad scale requests change nothing, and nothing is left behind at the end.

One deployment (1 prefill + 2 decode workers, an admin key) is shared by the tests of this module,
which run in order.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_serve_cli import alive, children_of

from pdserve.launch.local import free_port

pytestmark = pytest.mark.slow

KEY = "elastic-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
WORKER_ARGS = ["--chunk-size", "32", "--block-size", "16", "--kv-cache-mib", "32"]
TIMEOUT_S = 180


def pdserve_cmd() -> list[str]:
    exe = shutil.which("pdserve", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "pdserve"]


@dataclass
class Served:
    """A running ``pdserve serve`` and what its start-up looked like."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    models_statuses: list[int] = field(default_factory=list)
    first_request_status: int = 0
    pids: set[int] = field(default_factory=set)


def serve(tmp: Path, *args: str) -> Served:
    """Start ``pdserve serve``; poll /v1/models until 200, then send a request at once (the start-up race)."""
    port = free_port()
    log = tmp / f"serve-{port}.log"
    proc = subprocess.Popen(
        [*pdserve_cmd(), "serve", "--model", "tiny", "--port", str(port), "--threads-per-worker", "1",
         *args, "--worker-args", *WORKER_ARGS],
        env=dict(os.environ, PDSERVE_API_KEY=KEY), stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    served = Served(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        assert proc.poll() is None, f"pdserve serve exited: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, "/v1/models never answered 200"
        try:
            status = httpx.get(f"{served.url}/v1/models", headers=AUTH, timeout=5).status_code
        except httpx.HTTPError:
            time.sleep(0.02)
            continue
        served.models_statuses.append(status)
        if status == 200:
            break
        time.sleep(0.02)
    reply = httpx.post(f"{served.url}/v1/completions", headers=AUTH, timeout=60,
                       json={"model": "tiny", "prompt": "first", "max_tokens": 4})
    served.first_request_status = reply.status_code
    return served


def stop(served: Served) -> int:
    """SIGTERM the launcher; its exit code."""
    if served.proc.poll() is None:
        served.proc.send_signal(signal.SIGTERM)
    try:
        return served.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        served.proc.kill()
        return served.proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = serve(tmp_path_factory.mktemp("elastic"), "--prefill", "1", "--decode", "2")
    yield s
    stop(s)


def deployment(served: Served) -> dict[str, Any]:
    url = f"{served.url}/pdserve/workers?stats=false"
    d: dict[str, Any] = httpx.get(url, headers=AUTH, timeout=10).json()
    served.pids |= {w["pid"] for w in d["deployment"]["workers"] if w["pid"]}
    return d


def slots(served: Served) -> dict[str, dict[str, Any]]:
    return {w["worker_id"]: w for w in deployment(served)["deployment"]["workers"]}


def wait_for(served: Served, ok: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        d = deployment(served)
        if ok(d):
            return d
        assert time.monotonic() < deadline, f"{what}: {json.dumps(d['deployment'], indent=1)}"
        time.sleep(0.2)


def at_shape(served: Served, **shape: int) -> dict[str, Any]:
    """Wait until every pool has its target of ready workers, the targets are ``shape`` and nothing moves."""

    def ok(d: dict[str, Any]) -> bool:
        dep = d["deployment"]
        return all(
            dep["pools"][pool]["target"] == shape.get(pool, 0) == dep["pools"][pool]["actual"]
            for pool in ("prefill", "decode", "mixed")
        ) and all(w["state"] == "ready" for w in dep["workers"])

    return wait_for(served, ok, f"not at {shape}")


def stream(served: Served, prompt: str, max_tokens: int, on_token: Callable[[int], None] | None = None
           ) -> tuple[str, str | None, object]:
    """Stream a greedy completion; (text, finish_reason, error event or None)."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    text, reason, error, count = "", None, None, 0
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body, headers=AUTH, timeout=120) as r:
        if r.status_code != 200:
            return "", None, {"status": r.status_code, "body": r.read().decode()}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
                continue
            text += event["choices"][0]["text"]
            reason = event["choices"][0]["finish_reason"] or reason
            count += 1
            if on_token is not None:
                on_token(count)
    return text, reason, error


def scale(served: Served, *args: str, key: str | None = KEY) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PDSERVE_API_KEY=key) if key else {k: v for k, v in os.environ.items()
                                                             if k != "PDSERVE_API_KEY"}
    return subprocess.run([*pdserve_cmd(), "scale", "--url", served.url, *args, "--timeout", str(TIMEOUT_S)],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S + 30)


def test_the_first_request_after_models_answers_200_succeeds(served: Served, tmp_path: Path) -> None:
    runs = [served]
    for _ in range(1):  # the start-up race again, on a fresh (smaller) deployment
        s = serve(tmp_path, "--mode", "aggregated", "--mixed", "1")
        runs.append(s)
        assert stop(s) == 0
    for s in runs:
        assert s.first_request_status == 200
        assert 503 in s.models_statuses  # it was asked before any worker registered, and said not yet


def test_killed_workers_are_replaced_and_the_stream_is_unharmed(served: Served) -> None:
    at_shape(served, prefill=1, decode=2)
    want = stream(served, "supervise me", 160)
    assert want[2] is None and want[1] == "length"
    killed: dict[str, int] = {}

    def on_token(count: int) -> None:
        if count == 30 and not killed:
            workers = deployment(served)["workers"]
            decode = next(w for w in workers if w["role"] == "decode" and w["num_inflight"] > 0)
            prefill = next(w for w in workers if w["role"] == "prefill")  # idle: the prompt is done
            for w in (decode, prefill):
                os.kill(w["pid"], signal.SIGKILL)
                killed[w["worker_id"]] = w["pid"]

    got = stream(served, "supervise me", 160, on_token)
    assert len(killed) == 2
    assert got == want  # the stream went on on the other decode worker: same text
    after = at_shape(served, prefill=1, decode=2)["deployment"]["workers"]
    for w in after:
        if w["worker_id"] in killed:
            assert w["restarts"] == 1 and w["pid"] != killed[w["worker_id"]] and w["last_exit_code"] == -9
    for pid in killed.values():  # the launcher unlinked the dead decode worker's KV segment
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"pdserve-kv-{pid}-")]
    assert stream(served, "after", 8)[1] == "length"


def test_scale_up_then_flip_a_role(served: Served) -> None:
    result = scale(served, "--decode", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "done" in result.stdout
    before = slots(served)
    assert [w["role"] for w in before.values()].count("decode") == 3
    # One pool shrinks while another grows: a decode worker becomes a prefill worker, same process.
    result = scale(served, "--prefill", "2", "--decode", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    at_shape(served, prefill=2, decode=2)
    after = slots(served)
    flipped = [wid for wid, w in after.items() if before[wid]["role"] == "decode" and w["role"] == "prefill"]
    assert len(flipped) == 1 and set(after) == set(before)  # no slot added or removed
    assert after[flipped[0]]["pid"] == before[flipped[0]]["pid"]  # the same process: weights kept
    assert stream(served, "flipped", 8)[1] == "length"


def test_scale_down_under_16_streams_fails_no_request(served: Served) -> None:
    at_shape(served, prefill=2, decode=2)
    results: list[tuple[str, str | None, object]] = []
    lock = threading.Lock()
    streaming = threading.Semaphore(0)  # released once per stream at its first token

    def client(i: int) -> None:
        r = stream(served, f"load {i}", 384, lambda n: streaming.release() if n == 1 else None)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    # Watched from the client side: polling the router's in-flight count could miss short streams.
    for _ in range(8):
        assert streaming.acquire(timeout=TIMEOUT_S), "streams did not start"
    url = f"{served.url}/pdserve/scale"
    reply = httpx.post(url, json={"prefill": 1, "decode": 1}, headers=AUTH, timeout=10)
    assert reply.status_code == 200
    with lock:
        assert len(results) < 16  # the pools shrank under load, not after it
    for t in threads:
        t.join(timeout=TIMEOUT_S)
    assert len(results) == 16
    assert [r for r in results if r[2] is not None or r[1] != "length"] == []
    at_shape(served, prefill=1, decode=1)
    assert deployment(served)["recovery"]["num_failed"] == 0


def test_bad_scale_requests_are_refused_and_change_nothing(served: Served) -> None:
    before = deployment(served)["deployment"]
    url = f"{served.url}/pdserve/scale"
    assert httpx.post(url, json={"decode": 3}, timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.post(url, json={"decode": 3}, headers=wrong, timeout=10).status_code == 401
    for body in ({"decode": -1}, {"gpu": 1}, {"prefill": 0}, {"prefill": 0, "decode": 0, "mixed": 0}):
        reply = httpx.post(url, json=body, headers=AUTH, timeout=10)
        assert reply.status_code == 400 and reply.json()["error"]["message"], body
    result = scale(served, "--prefill", "0")
    assert result.returncode != 0 and "no complete serving path" in result.stderr
    result = scale(served, "--decode", "2", key=None)
    assert result.returncode != 0 and "401" in result.stderr
    after = deployment(served)["deployment"]
    assert after["generation"] == before["generation"] and after["pools"] == before["pools"]


def test_status_shows_pools_and_where_workers_run(served: Served) -> None:
    out = subprocess.run([*pdserve_cmd(), "status", "--url", served.url, "--once"], capture_output=True,
                         text=True, timeout=60, env=dict(os.environ, PDSERVE_API_KEY=KEY))
    assert out.returncode == 0, out.stderr
    assert "prefill 1/1" in out.stdout and "decode 1/1" in out.stdout
    for wid, w in slots(served).items():
        assert wid in out.stdout and str(w["pid"]) in out.stdout


def test_shutdown_leaves_no_process_or_segment(served: Served) -> None:
    deployment(served)
    children = children_of(served.proc.pid)
    assert stop(served) == 0
    deadline = time.monotonic() + 15
    while any(alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [c for c in children if alive(c)], "processes left behind"
    left = [n for n in os.listdir("/dev/shm") for pid in served.pids if n.startswith(f"pdserve-kv-{pid}-")]
    assert left == [], left
