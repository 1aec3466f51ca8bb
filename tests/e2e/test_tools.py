"""The operator tools against real deployments: `pdserve bench` (disaggregated and
aggregated, the same run as against any other server) and `pdserve status`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from pdserve.launch.local import LocalLauncher

pytestmark = pytest.mark.slow


def run_pdserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pdserve", *args], capture_output=True, text=True, timeout=180, check=False
    )


@pytest.mark.parametrize("deployment", ["disagg_shm", "aggregated"])
def test_bench_runs_against_pdserve(deployment: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    launcher: LocalLauncher = request.getfixturevalue(deployment)
    out = tmp_path / "result.json"
    done = run_pdserve(
        "bench", "--base-url", launcher.url, "--workload", "synthetic", "--input-len", "uniform:8:64",
        "--output-len", "8", "--num-requests", "12", "--request-rate", "inf", "--max-concurrency", "4",
        "--tokenizer", "tiny", "--slo", "ttft_ms=60000,tpot_ms=60000", "--output", str(out), "--no-progress",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    [run] = json.loads(out.read_text())["runs"]
    summary = run["summary"]
    assert summary["num_ok"] == 12
    assert "ttft" in json.dumps(summary).lower() and "goodput" in json.dumps(summary).lower()
    # Both deployments answer with their traces (--trace-responses): the bench reports the breakdown.
    parts = summary["server_ttft_parts_ms"]
    assert sorted(parts) == ["delivery", "prefill", "queue", "transfer"]
    assert all(parts[p]["count"] == 12 for p in parts) and parts["prefill"]["mean"] > 0
    assert sum(parts[p]["mean"] for p in parts) <= summary["ttft_ms"]["mean"]  # the server's view is inside
    assert "server's TTFT breakdown" in done.stdout


def test_status_once_shows_every_worker(disagg_shm: LocalLauncher) -> None:
    body = {"model": "tiny", "prompt": "s", "max_tokens": 2}
    httpx.post(f"{disagg_shm.url}/v1/completions", json=body, timeout=60)
    done = run_pdserve("status", "--url", disagg_shm.url, "--once")
    assert done.returncode == 0, done.stderr
    screen = done.stdout
    for worker in ("prefill-0", "prefill-1", "decode-0", "decode-1"):
        assert worker in screen
    assert "requests:" in screen and "recovery:" in screen
    breakdown = next(line for line in screen.splitlines() if line.startswith("TTFT breakdown"))
    assert "prefill -" not in breakdown and "transfer" in breakdown  # served requests have a breakdown


def test_status_reports_an_unreachable_router() -> None:
    done = run_pdserve("status", "--url", "http://127.0.0.1:9", "--once")
    assert done.returncode == 1 and "cannot read" in done.stderr
