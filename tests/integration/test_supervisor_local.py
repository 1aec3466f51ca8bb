"""The supervisor over real processes (LocalBackend, router, workers) when new workers cannot start:
``pdserve scale`` reports it and exits 1, ``pdserve status`` shows the failed slot, the slot is not
retried forever, and the deployment keeps serving.

The failure is injected by the test: once the deployment is up, the spec factory gives new workers an
invalid option (like a bad model path or a broken host, it makes a real worker exit at start; this one
fails before loading anything, which keeps the test short).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time

import httpx
import pytest

from pdserve.cli import _build_parser
from pdserve.launch.base import WorkerSpec
from pdserve.launch.serve import build_supervisor, make_backend

pytestmark = pytest.mark.slow


def test_a_worker_that_cannot_start_is_reported_and_not_retried_forever() -> None:
    parser, _ = _build_parser()
    args = parser.parse_args(["serve", "--model", "tiny", "--port", "0", "--threads-per-worker", "1",
                              "--mode", "aggregated", "--mixed", "1",
                              "--worker-args", "--kv-cache-mib", "32"])
    sup = build_supervisor(args, make_backend(args))
    thread = threading.Thread(target=sup.run)
    try:
        sup.start()
        good = sup.make_spec
        starts: list[str] = []

        def broken(worker_id: str, role: str, router: str) -> WorkerSpec:
            starts.append(worker_id)
            spec = good(worker_id, role, router)
            return dataclasses.replace(spec, args=[*spec.args, "--kv-transport", "bogus"])  # exits at start

        sup.make_spec = broken
        thread.start()
        scale = subprocess.run([sys.executable, "-m", "pdserve", "scale", "--url", sup.url, "--mixed", "2"],
                               capture_output=True, text=True, timeout=300)
        assert scale.returncode == 1
        assert "mixed-1 (mixed) failed: cannot start: exited 3 times before registering" in scale.stderr
        status = subprocess.run([sys.executable, "-m", "pdserve", "status", "--url", sup.url, "--once"],
                                capture_output=True, text=True, timeout=60)
        assert "mixed 1/2 (failed 1)" in status.stdout and "cannot start" in status.stdout
        assert starts == ["mixed-1"] * 3
        time.sleep(3)  # the failed slot stays failed: no further start
        assert starts == ["mixed-1"] * 3
        body = {"model": "tiny", "prompt": "still", "max_tokens": 4}
        reply = httpx.post(f"{sup.url}/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200  # the others keep serving
    finally:
        sup.request_stop()
        if thread.is_alive():
            thread.join()
        sup.close()
