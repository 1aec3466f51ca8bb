"""A running deployment changes its workers' torch threads (``pdserve serve``, ``POST /pdserve/scale``
with ``"threads"``): 2 mixed workers × 1 thread become 1 × 2 under a stream of requests, none of which
fails, and the remaining worker reports its 2 threads (docs/scaling.md)."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_elastic import AUTH, KEY, deployment, pdserve_cmd, scale, serve, stop, stream, wait_for

pytestmark = pytest.mark.slow


def test_two_workers_at_one_thread_become_one_at_two_under_load(tmp_path: Path) -> None:
    served = serve(tmp_path, "--mode", "aggregated", "--mixed", "2")  # --threads-per-worker 1
    done = threading.Event()
    try:
        def two_at_one(d: dict[str, Any]) -> bool:
            return len(d["workers"]) == 2 and all(w["threads"] == 1 for w in d["workers"])

        before = wait_for(served, two_at_one, "2 mixed workers at 1 thread")
        assert before["deployment"]["threads"] is None  # no target: as each worker was started
        results: list[tuple[str, str | None, object]] = []

        def client(i: int) -> None:
            n = 0
            while not done.is_set():
                results.append(stream(served, f"threads {i} {n}", 24))
                n += 1

        clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(2)]
        for t in clients:
            t.start()
        wait_for(served, lambda d: len(results) >= 2, "the load did not start")
        reply = httpx.post(f"{served.url}/pdserve/scale", json={"mixed": 1, "threads": 2}, headers=AUTH,
                           timeout=10)
        assert reply.status_code == 200, reply.text
        assert reply.json()["threads"] == 2 and reply.json()["previous_threads"] is None

        def one_at_two(d: dict[str, Any]) -> bool:
            dep = d["deployment"]
            return ([w["threads"] for w in d["workers"]] == [2] and dep["pools"]["mixed"]["actual"] == 1
                    and [(w["state"], w["threads"]) for w in dep["workers"]] == [("ready", 2)])

        after = wait_for(served, one_at_two, "1 mixed worker at 2 threads")
        served_before = len(results)
        wait_for(served, lambda d: len(results) >= served_before + 2, "no request after the change")
        done.set()
        for t in clients:
            t.join(timeout=120)
        assert [r for r in results if r[2] is not None or r[1] != "length"] == []
        assert after["deployment"]["threads"] == 2 and after["workers"][0]["role"] == "mixed"
        assert deployment(served)["recovery"]["num_failed"] == 0
        result = scale(served, "--threads", "2")  # already there: the CLI's wait ends at once
        assert result.returncode == 0 and "done" in result.stdout, result.stdout + result.stderr
        status = subprocess.run([*pdserve_cmd(), "status", "--url", served.url, "--once"], text=True,
                                capture_output=True, timeout=60, env=dict(os.environ, PDSERVE_API_KEY=KEY))
        assert status.returncode == 0 and "threads target: 2" in status.stdout, status.stderr
    finally:
        done.set()
        code = stop(served)
    assert code == 0
