"""Rate matching between the pools, as users run it (``pdserve serve``): a decode worker with room
for three requests at a time defers the other reservations, the prefill worker computes no prompt
before its home is reserved (the gate), every request still completes with the offline engine's
greedy tokens, and the throttling is counted in the workers' load, ``/metrics`` and ``pdserve status``.
A prompt longer than a worker's whole KV cache is refused with a 400, not queued forever.
"""

from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_elastic import pdserve_cmd

from pdserve import LLM, SamplingParams
from pdserve.launch.local import free_port

pytestmark = pytest.mark.slow

# 24 blocks of 16 tokens per worker: a 100-token prompt reserves 7 blocks on D, so 3 fit at once.
WORKER_ARGS = ["--chunk-size", "32", "--block-size", "16", "--num-blocks", "24", "--no-prefix-caching"]
NUM_REQUESTS = 8
MAX_TOKENS = 12


def prompt(i: int) -> list[int]:
    return [1, *((7 * i + k) % 200 + 3 for k in range(99))]


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, f"pdserve serve exited: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, "/v1/models never answered 200"
        try:
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)


def workers(url: str) -> dict[str, dict[str, Any]]:
    data = httpx.get(f"{url}/pdserve/workers", timeout=10).json()
    return {w["role"]: w["stats"]["load"] for w in data["workers"]}


def test_full_decode_worker_throttles_prefill_and_nothing_is_lost(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [*pdserve_cmd(), "serve", "--model", "tiny", "--port", str(port), "--threads-per-worker", "1",
         "--prefill", "1", "--decode", "1", "--disagg-policy", "always", "--worker-args", *WORKER_ARGS],
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    try:
        wait_ready(url, proc, log)

        def complete(i: int) -> str:
            reply = httpx.post(f"{url}/v1/completions", timeout=120, json={
                "model": "tiny", "prompt": prompt(i), "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True,
            })
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] == MAX_TOKENS
            return str(reply.json()["choices"][0]["text"])

        with ThreadPoolExecutor(NUM_REQUESTS) as pool:
            outputs = list(pool.map(complete, range(NUM_REQUESTS)))
        offline = LLM("tiny", block_size=16, chunk_size=32)
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        expected = [o.text for o in offline.generate([prompt(i) for i in range(NUM_REQUESTS)], params)]
        assert outputs == expected

        load = workers(url)
        assert load["decode"]["num_deferred_reservations"] >= 1  # D had no room for some
        assert load["prefill"]["num_gate_waits"] >= 1  # and P waited for their homes
        # Every prompt was computed once: no prefill ran without a home, none was recomputed.
        assert load["prefill"]["num_prefill_tokens"] == NUM_REQUESTS * len(prompt(0))
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert "pdserve_kv_reservations_deferred_total{" in metrics
        assert "pdserve_prefill_gate_waits_total{" in metrics
        # A prompt longer than a worker's whole cache (24 × 16 = 384 tokens) could never get its
        # blocks: the router refuses it at once (it used to wait forever, holding up the queue).
        card = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
        assert card["max_model_len"] == 24 * 16
        too_long = httpx.post(f"{url}/v1/completions", timeout=30, json={
            "model": "tiny", "prompt": [1, *(k % 200 + 3 for k in range(400))], "max_tokens": 4})
        assert too_long.status_code == 400, too_long.text
        assert too_long.json()["error"]["code"] == "context_length_exceeded"
        assert complete(0) == expected[0]  # and the deployment serves on

        status = subprocess.run([*pdserve_cmd(), "status", "--url", url, "--once"], capture_output=True,
                                text=True, timeout=60, env={**os.environ, "PATH": "/usr/bin:/bin"})
        assert status.returncode == 0, status.stderr
        line = next(x for x in status.stdout.splitlines() if x.startswith("rate matching:"))
        assert f"deferred (decode full) {load['decode']['num_deferred_reservations']}" in line
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, -15, 143), log.read_text()[-2000:]
