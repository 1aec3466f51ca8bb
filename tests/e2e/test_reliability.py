"""Lifecycle, cancellation, overload and access control through real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import launch
from test_faults import stream_completion, workers

from pdserve.launch.local import LocalLauncher

pytestmark = pytest.mark.slow

API_KEY = "test-key-not-a-secret"


@pytest.fixture(scope="module")
def guarded() -> Iterator[LocalLauncher]:
    """1 prefill + 2 decode workers behind an API key and a 3-request admission limit."""
    os.environ["PDSERVE_API_KEY"] = API_KEY
    try:
        launcher = launch(
            "disaggregated", "tcp", router_args=("--max-inflight", "3"), num_prefill=1, num_decode=2
        )
    finally:
        del os.environ["PDSERVE_API_KEY"]
    yield launcher
    launcher.stop()


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def body(prompt: str = "hello", max_tokens: int = 8, **extra: object) -> dict[str, object]:
    return {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }


def test_api_key_is_enforced(guarded: LocalLauncher) -> None:
    url = guarded.url
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        reply = httpx.post(f"{url}/v1/completions", json=body(), headers=headers, timeout=10)
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
        assert API_KEY not in reply.text
    assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
    assert httpx.get(f"{url}/live", timeout=10).status_code == 200
    reply = httpx.post(f"{url}/v1/completions", json=body(), headers=auth(), timeout=30)
    assert reply.status_code == 200


def test_overload_gets_429_fast_and_recovers(guarded: LocalLauncher) -> None:
    url = guarded.url
    stop = threading.Event()
    started = threading.Semaphore(0)

    def hold() -> None:  # three long streams fill the admission limit
        payload = body("hold", 4000, stream=True)
        with httpx.stream("POST", f"{url}/v1/completions", json=payload, headers=auth(), timeout=60) as r:
            assert r.status_code == 200
            started.release()
            for _ in r.iter_lines():
                if stop.is_set():
                    break

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in threads:
        assert started.acquire(timeout=30), "a holding stream did not start"
    start = time.monotonic()
    reply = httpx.post(f"{url}/v1/completions", json=body(), headers=auth(), timeout=10)
    elapsed_s = time.monotonic() - start
    assert reply.status_code == 429
    assert "Retry-After" in reply.headers and reply.json()["error"]["code"] == "rate_limit_exceeded"
    assert elapsed_s < 0.5, f"429 took {elapsed_s * 1e3:.0f} ms"
    stop.set()
    for t in threads:
        t.join()
    wait_idle_authed(url)
    assert httpx.post(f"{url}/v1/completions", json=body(), headers=auth(), timeout=30).status_code == 200


def wait_idle_authed(url: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        ws = httpx.get(f"{url}/pdserve/workers", headers=auth(), timeout=10).json()["workers"]
        loads = [w["stats"]["load"] for w in ws if w["stats"]]
        if all(ld["num_free_blocks"] == ld["num_total_blocks"] and ld["num_held"] == 0 for ld in loads):
            return
        assert time.monotonic() < deadline, f"KV still held after the load: {loads}"
        time.sleep(0.2)


@pytest.mark.parametrize("stage", ["prefill", "decode"])
def test_client_disconnect_frees_kv_everywhere(guarded: LocalLauncher, stage: str) -> None:
    url = guarded.url
    prompt = ("cancel me " * 400)[:3900] if stage == "prefill" else "cancel me"
    payload = body(prompt, 3000, stream=True)
    with httpx.stream("POST", f"{url}/v1/completions", json=payload, headers=auth(), timeout=60) as r:
        if stage == "decode":
            for i, _ in enumerate(r.iter_lines()):
                if i > 20:
                    break
        else:
            time.sleep(0.05)  # still prefilling 3.9k tokens
    wait_idle_authed(url)


def test_rogue_worker_without_the_cluster_secret_is_refused(guarded: LocalLauncher) -> None:
    url = guarded.url
    before = {
        w["worker_id"]
        for w in httpx.get(f"{url}/pdserve/workers?stats=false", headers=auth(), timeout=10).json()["workers"]
    }
    env = {k: v for k, v in os.environ.items() if k != "PDSERVE_CLUSTER_SECRET"}
    rogue = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pdserve",
            "worker",
            "--role",
            "decode",
            "--router",
            f"tcp://127.0.0.1:{guarded.control_port}",
            "--worker-id",
            "rogue",
            "--model",
            "tiny",
            "--kv-cache-mib",
            "16",
            "--threads",
            "1",
        ],
        env=env,
    )
    try:
        time.sleep(12)  # long enough to load the model and try to register
        after = {
            w["worker_id"]
            for w in httpx.get(f"{url}/pdserve/workers?stats=false", headers=auth(), timeout=10).json()[
                "workers"
            ]
        }
        assert "rogue" not in after and after == before
    finally:
        rogue.kill()
        rogue.wait()


def test_worker_sigterm_drains_then_exits() -> None:
    launcher = launch("disaggregated", "shm", num_prefill=1, num_decode=2)
    try:
        url = launcher.url
        result: list[tuple[str, str | None, object]] = []
        serving: list[dict] = []  # type: ignore[type-arg]

        def on_token(count: int) -> None:
            if count == 10:
                serving.append(next(w for w in workers(url) if w["role"] == "decode" and w["num_inflight"]))
                os.kill(serving[0]["pid"], signal.SIGTERM)

        text, reason, error = stream_completion(url, "migrate me", 400, on_token=on_token)
        assert error is None and reason == "length"
        # The draining worker finished the stream itself (no migration needed) and then left.
        recovery = httpx.get(f"{url}/pdserve/workers", timeout=10).json()["recovery"]
        assert recovery["num_retries"] == 0
        proc = next(p for name, p in launcher.procs if p.pid == serving[0]["pid"])
        assert proc.wait(timeout=30) == 0
        result.append((text, reason, error))
        # New requests go to the remaining workers.
        assert stream_completion(url, "after drain", 8)[2] is None
    finally:
        launcher.stop()


def test_router_sigterm_finishes_streams_and_refuses_new_ones() -> None:
    launcher = launch("aggregated", num_mixed=1)
    try:
        url = launcher.url
        router = launcher.procs[0][1]
        statuses: list[int] = []
        got: list[tuple[str, str | None, object]] = []

        def on_token(count: int) -> None:
            if count == 5:
                router.send_signal(signal.SIGTERM)
                time.sleep(0.3)
                statuses.append(httpx.post(f"{url}/v1/completions", json=body(), timeout=10).status_code)

        got.append(stream_completion(url, "migrate me", 600, on_token=on_token))
        assert got[0][2] is None and got[0][1] == "length"  # the in-flight stream completed
        assert statuses == [503]
        assert router.wait(timeout=30) == 0
    finally:
        launcher.stop()


def test_error_event_shape_is_openai_like(guarded: LocalLauncher) -> None:
    url = guarded.url
    reply = httpx.post(
        f"{url}/v1/completions",
        content=b"{not json",
        headers={**auth(), "Content-Type": "application/json"},
        timeout=10,
    )
    assert reply.status_code == 400
    error = json.loads(reply.text)["error"]
    assert set(error) >= {"message", "type", "param", "code"} and "Traceback" not in reply.text
    reply = httpx.post(f"{url}/v1/completions", json=body("x" * 4000, 500), headers=auth(), timeout=10)
    assert reply.status_code == 400 and "4096" in reply.json()["error"]["message"]
