"""The SLO planner as users run it (``pdserve serve --planner slo``): a load that shifts from
decode-heavy to prefill-heavy and back moves capacity toward prefill and back, with no failed request,
and every decision shows in ``/pdserve/planner``, ``/metrics``, the trace log and ``pdserve status``.

The decode-heavy phases send one short prompt at a time (24 tokens out); the prefill-heavy phase keeps
three ~600-token prompts in flight (one token out), which saturates one worker's prefill.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from test_elastic import AUTH, KEY, TIMEOUT_S, pdserve_cmd, serve, stop

pytestmark = pytest.mark.slow


class Load:
    """Closed-loop clients through the openai SDK; the phase says what they send."""

    def __init__(self, url: str) -> None:
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        self.phase = "decode"
        self.errors: list[str] = []
        self.done = {"decode": 0, "prefill": 0}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(3)]

    def _run(self, i: int) -> None:
        while not self._stop.is_set():
            phase = self.phase
            if phase == "decode" and i > 0:  # decode-heavy: one stream at a time
                time.sleep(0.05)
                continue
            prompt, max_tokens = ("tell me a story", 24) if phase == "decode" else ("x" * 600 + str(i), 1)
            try:
                out = self.client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens)
                assert out.choices[0].finish_reason in ("length", "stop")
                self.done[phase] += 1
            except Exception as exc:  # every failure is reported by the test
                self.errors.append(f"{phase}: {exc!r}")

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=130)


def planner(url: str) -> dict[str, Any]:
    view: dict[str, Any] = httpx.get(f"{url}/pdserve/planner", headers=AUTH, timeout=10).json()
    return view


def wait_target(url: str, ok: Any, what: str) -> dict[str, Any]:
    """Poll until the latest decision's target satisfies ``ok`` and every worker is ready."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        history = planner(url)["history"]
        workers = httpx.get(f"{url}/pdserve/workers?stats=false", headers=AUTH, timeout=10).json()
        slots = workers["deployment"]["workers"]
        if history and ok(history[-1]["target"]) and all(s["state"] == "ready" for s in slots):
            return history[-1]
        assert time.monotonic() < deadline, f"{what}: {json.dumps(history[-3:], indent=1)}"
        time.sleep(0.5)


def prefill_capable(target: dict[str, int]) -> int:
    return target["prefill"] + target["mixed"]


def test_load_shift_moves_capacity_to_prefill_and_back(tmp_path: Path) -> None:
    log = tmp_path / "trace.jsonl"
    served = serve(
        tmp_path,
        "--mode",
        "aggregated",
        "--mixed",
        "1",
        "--planner",
        "slo",
        "--ttft-ms",
        "2000",
        "--itl-ms",
        "1000",
        "--max-workers",
        "2",
        "--interval",
        "1",
        "--planner-window",
        "4",
        "--down-intervals",
        "2",
        "--trace-log",
        str(log),
    )
    try:
        url = served.url
        with Load(url) as load:
            time.sleep(4)  # decode-heavy: the floor serves it
            assert prefill_capable(planner(url)["history"][-1]["target"]) == 1
            load.phase = "prefill"
            up = wait_target(url, lambda t: prefill_capable(t) == 2, "no move toward prefill")
            assert load.done["prefill"] > 0
            load.phase = "decode"
            down = wait_target(url, lambda t: sum(t.values()) == 1, "no move back")
            assert load.done["decode"] > 0
        assert load.errors == []  # no request failed through the planner's actions
        view = planner(url)
        actions = [d["action"] for d in view["history"]]
        assert "scale_up" in actions or "reshape" in actions
        assert "scale_down" in actions and view["num_shed"] == 0
        assert up["inputs"]["prompt_mean"] > down["inputs"]["prompt_mean"]
        metrics = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text
        assert 'pdserve_planner_decisions_total{action="scale_down"}' in metrics
        assert 'pdserve_planner_latency_seconds{kind="predicted",metric="ttft_p90"}' in metrics
        status = subprocess.run(
            [*pdserve_cmd(), "status", "--url", url, "--once"],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PDSERVE_API_KEY": KEY, "PATH": "/usr/bin:/bin"},
        )
        assert status.returncode == 0, status.stderr
        assert "planner:" in status.stdout and "1M" in status.stdout  # the last decisions
        records = [json.loads(line) for line in log.read_text().splitlines()]
        assert any(r.get("planner", {}).get("action") == "scale_down" for r in records)
    finally:
        assert stop(served) == 0


def test_core_budget_lets_the_planner_weigh_thread_counts(tmp_path: Path) -> None:
    """``--max-cores 2`` without fixed threads: ``serve`` measures the model at 1 and 2 threads
    before starting workers, and every decision weighs ``1M×2t`` beside the one-thread shapes,
    reading the workers' own thread counts."""
    served = serve(tmp_path, "--mode", "aggregated", "--mixed", "2", "--threads-per-worker", "0",
                   "--planner", "slo", "--ttft-ms", "2000", "--itl-ms", "1000", "--max-cores", "2",
                   "--interval", "1", "--planner-window", "4")
    try:
        url = served.url
        deadline = time.monotonic() + TIMEOUT_S
        while not (history := planner(url)["history"]):
            assert time.monotonic() < deadline, "no planner decision"
            time.sleep(0.5)
        last = history[-1]
        shapes = {c["shape"] for c in last["candidates"]}
        assert {"1M×2t", "2M×1t", "1P+1D×1t"} <= shapes, shapes
        assert last["inputs"]["threads"] == 1  # two workers on two cores start with one thread each
        assert "threads" in last["current"] and last["current"]["threads"] == 1
    finally:
        assert stop(served) == 0
    out = served.log.read_text()
    assert "1 thread(s): prefill" in out and "2 thread(s): prefill" in out
