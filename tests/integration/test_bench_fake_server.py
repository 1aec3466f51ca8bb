"""``pdserve bench`` against a server that streams on a known schedule.

The fake server runs in its own process (the bench's event loop and the
server's must not share a GIL for the timings to mean anything) and sends
the first token ``ttft_ms`` after a request arrived, then one chunk every
``itl_ms``. The measured latencies must match that schedule within a few
milliseconds, and SLO attainment / goodput must match the hand-computed
share of slow requests.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pdserve.bench.arrivals import ArrivalConfig
from pdserve.bench.client import ClientConfig
from pdserve.bench.metrics import SLO
from pdserve.bench.runner import LoadConfig, RunResult, SweepResult, run_load, run_sweep
from pdserve.bench.workload import WorkloadConfig, make_workload

# The measurement's own error (the quietest request of a run) …
TOLERANCE_MS = 3.0
# … and what waiting for a core on a busy shared 2-core machine may add to a median.
NOISY_MS = 15.0


class FakeProcess:
    def __init__(self, *args: str) -> None:
        cmd = [sys.executable, "-m", "pdserve.bench.fake_server", "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "http://" not in line:
            self.proc.kill()
            raise RuntimeError(
                f"fake server did not start: {line!r} {self.proc.stderr.read() if self.proc.stderr else ''}"
            )
        self.url = line.strip().rsplit(" ", 1)[-1]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def steady() -> Iterator[str]:
    """TTFT 50 ms, then a chunk every 20 ms."""
    server = FakeProcess("--ttft-ms", "50", "--itl-ms", "20")
    yield server.url
    server.stop()


def bench(
    url: str,
    num_requests: int,
    rate: float,
    output_len: int = 8,
    endpoint: str = "completions",
    slo: SLO | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 60.0,
    **load: object,
) -> RunResult:
    client = ClientConfig(
        base_url=url, model="fake", endpoint=endpoint, headers=headers or {}, timeout_s=timeout_s
    )
    config = LoadConfig(
        arrivals=ArrivalConfig(rate=rate, kind="constant"), num_requests=num_requests, progress=False, **load
    )  # type: ignore[arg-type]
    workload = make_workload(WorkloadConfig(input_len="uniform:4:32", output_len=str(output_len)))
    return asyncio.run(run_load(client, config, workload, slo))


def ms(values: list[float]) -> list[float]:
    return [v * 1e3 for v in values]


def quietest(run: Callable[[], RunResult], attempts: int = 3) -> RunResult:
    """The run least disturbed by other jobs on the machine: stop at one whose median TTFT is within
    NOISY_MS of its minimum, else take the one with the lowest median (a real error in the
    measurement shifts every attempt alike, so the test can still fail)."""
    runs = []
    for _ in range(attempts):
        runs.append(run())
        s = runs[-1].summary
        if s.ttft_ms["p50"] - s.ttft_ms["min"] <= NOISY_MS:
            break
    return min(runs, key=lambda r: r.summary.ttft_ms["p50"])


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_latencies_match_the_schedule(steady: str, endpoint: str) -> None:
    # 57.3 ms apart: no two requests' chunks are due at the same moment (the client would read one late);
    # the warm-up requests open the connections
    run = quietest(
        lambda: bench(
            steady, num_requests=16, rate=1 / 0.0573, output_len=8, endpoint=endpoint, warmup_requests=4
        )
    )
    s = run.summary
    assert s.num_ok == 16 and s.num_failed == 0
    measured = [r for r in run.records if not r.warmup]
    ttfts = ms([r.ttft_s for r in measured if r.ttft_s is not None])
    e2es = ms([r.e2e_s for r in measured if r.e2e_s is not None])
    note = f"TTFTs {[round(t, 1) for t in ttfts]} (load average {os.getloadavg()})"
    # Never before the schedule: chat's empty opening role chunk must not count as the first token.
    # Latencies only grow when the shared machine makes a process wait for a core, so the quietest
    # request shows the measurement's own error: a few ms at most. The median may suffer more.
    assert 50 - 0.5 <= min(ttfts) <= 50 + TOLERANCE_MS, note
    assert statistics.median(ttfts) <= 50 + NOISY_MS, note
    assert 190 - 0.5 <= min(e2es) <= 190 + TOLERANCE_MS, note
    assert statistics.median(e2es) <= 190 + NOISY_MS, note
    # a late chunk makes one gap longer and the next shorter: the medians stay on the schedule
    assert s.itl_ms["p50"] == pytest.approx(20, abs=1.0), note
    assert s.itl_ms["count"] == 16 * 7
    assert s.tpot_ms["p50"] == pytest.approx(20, abs=1.5), note  # (E2E − TTFT) / 7
    for r in run.records:
        assert r.num_output_tokens == 8 and r.token_source == "usage" and r.chunk_tokens == [1] * 8
        assert 4 <= r.num_prompt_tokens <= 32  # the server's count (words) came back
    assert s.num_short_outputs == 0
    # 16 requests 57.3 ms apart, each 190 ms long: the window is 15 × 57.3 + 190 ms
    assert 15 * 0.0573 + 0.19 - 0.005 <= s.duration_s <= 15 * 0.0573 + 0.19 + 0.15
    assert s.request_throughput == pytest.approx(16 / s.duration_s)
    assert s.output_throughput == pytest.approx(16 * 8 / s.duration_s)


def test_chunks_of_several_tokens_spread_their_gap(steady: str) -> None:
    run = bench(steady, num_requests=6, rate=20, output_len=16, headers={"x-fake-tokens-per-chunk": "4"})
    for r in run.records:
        assert r.chunk_tokens == [4, 4, 4, 4] and r.num_output_tokens == 16
        assert len(r.itls_s) == 12  # the first chunk's 3 extra tokens add no ITL
    s = run.summary
    assert s.itl_ms["p50"] == pytest.approx(20 / 4, abs=0.5)
    assert s.tpot_ms["p50"] == pytest.approx(3 * 20 / 15, abs=0.4)  # (E2E − TTFT) / (16 − 1)


def retry_if_disturbed(run: Callable[[], RunResult], disturbed: Callable[[RunResult], bool]) -> RunResult:
    """Run again (at most twice) when other jobs on the shared machine stalled this process for so long
    that a request's fate flipped; ``disturbed`` looks only at requests whose fate is known in advance,
    so a wrong measurement still fails the test."""
    result = run()
    for _ in range(2):
        if not disturbed(result):
            break
        result = run()
    return result


@pytest.mark.parametrize(
    ("slow_args", "slo", "slow_e2e_s"),
    [
        # the slow ones miss the TTFT SLO by 300 ms; the fast ones meet both with 295 / 45 ms to spare
        (("--slow-ttft-ms", "600", "--slow-itl-ms", "5"), SLO(ttft_ms=300, tpot_ms=50), 0.600 + 10 * 0.005),
        # the slow ones miss the TPOT SLO by 50 ms
        (("--slow-ttft-ms", "5", "--slow-itl-ms", "100"), SLO(ttft_ms=300, tpot_ms=50), 0.005 + 10 * 0.100),
    ],
)
def test_goodput_and_attainment_every_4th_request_slow(
    slow_args: tuple[str, ...], slo: SLO, slow_e2e_s: float
) -> None:
    server = FakeProcess("--ttft-ms", "5", "--itl-ms", "5", "--slow-every", "4", *slow_args)

    def fast_one_missed(run: RunResult) -> bool:
        return any(not slo.met(r) for r in run.records if not r.warmup and r.index % 4 != 3)

    try:
        # 4 warm-up requests (the server counts them: its 4th is slow) + 20 measured, 25 ms apart
        run = retry_if_disturbed(
            lambda: bench(server.url, num_requests=20, rate=40, output_len=11, slo=slo, warmup_requests=4),
            fast_one_missed,
        )
    finally:
        server.stop()
    s = run.summary
    assert len(run.records) == 24 and s.num_requests == 20
    # measured requests are the server's 5th..24th: 8, 12, 16, 20, 24 are slow
    assert s.num_good == 15
    assert s.attainment == pytest.approx(0.75)
    assert s.goodput == pytest.approx(15 / s.duration_s)
    bad = [r.index for r in run.records if not r.warmup and not slo.met(r)]
    assert bad == [7, 11, 15, 19, 23]  # 0-based positions of the server's 8th, 12th, …
    # hand-computed window: sends at 0.1 .. 0.575 s, and the last one is slow
    # (never shorter; longer when a busy machine delays the last request)
    assert 0.475 + slow_e2e_s - 0.005 <= s.duration_s <= 0.475 + slow_e2e_s + 0.15
    assert s.goodput == pytest.approx(15 / (0.475 + slow_e2e_s), rel=0.25)


def test_failures_are_counted_by_type_and_never_good() -> None:
    server = FakeProcess("--ttft-ms", "5", "--itl-ms", "2", "--fail-every", "5", "--fail-status", "503")
    try:
        run = bench(server.url, num_requests=20, rate=100, output_len=4, slo=SLO(ttft_ms=1000))
    finally:
        server.stop()
    s = run.summary
    assert s.num_failed == 4 and s.failures == {"http_503": 4}
    assert s.num_ok == 16 and s.num_good == 16 and s.attainment == pytest.approx(0.8)
    failed = [r for r in run.records if r.error_type]
    assert all("fake failure" in (r.error or "") for r in failed)


def test_connection_refused_is_a_connect_failure() -> None:
    run = bench("http://127.0.0.1:9", num_requests=3, rate=math.inf, timeout_s=5)
    assert run.summary.failures == {"connect": 3}


def test_max_concurrency_and_duration() -> None:
    server = FakeProcess("--ttft-ms", "20", "--itl-ms", "10")
    try:
        # infinite rate for 0.5 s with at most 3 in flight: closed loop, each request ≈ 50 ms
        client = ClientConfig(base_url=server.url, model="fake")
        load = LoadConfig(
            arrivals=ArrivalConfig(rate=math.inf), duration_s=0.5, max_concurrency=3, progress=False
        )
        workload = make_workload(WorkloadConfig(input_len="8", output_len="4"))
        run = asyncio.run(run_load(client, load, workload))
    finally:
        server.stop()
    assert run.summary.num_failed == 0
    assert 3 * 0.5 / 0.050 * 0.6 <= run.summary.num_requests <= 3 * 0.5 / 0.050 + 3  # ≈ 30
    # at no moment were more than 3 requests in flight
    events = sorted(itertools.chain.from_iterable(
        ((r.sent_s, 1), (r.sent_s + (r.e2e_s or 0), -1)) for r in run.records
    ))  # fmt: skip
    assert max(itertools.accumulate(delta for _, delta in events)) == 3


def test_sweep_finds_the_highest_rate_meeting_the_target() -> None:
    # 2 generation slots, 21 ms per request (TTFT 5 ms + 8 × 2 ms): capacity ≈ 95 req/s. At 10 and 20
    # req/s nobody waits; at 1000 req/s the 12 requests come at once and request k waits k // 2 × 21 ms
    # for a slot, so those from k = 6 on miss the 60 ms TTFT SLO.
    server = FakeProcess("--ttft-ms", "5", "--itl-ms", "2", "--max-inflight", "2")
    client = ClientConfig(base_url=server.url, model="fake")
    load = LoadConfig(arrivals=ArrivalConfig(rate=1.0, kind="constant"), num_requests=12, progress=False)

    def sweep() -> SweepResult:
        workload = lambda: make_workload(WorkloadConfig(input_len="8", output_len="9"))  # noqa: E731
        return asyncio.run(run_sweep(client, load, [10.0, 20.0, 1000.0], workload, SLO(ttft_ms=60)))

    try:
        result = sweep()
        for _ in range(2):  # the machine stalled a request the schedule says must be good: again
            if result.attainment[10.0] == 1.0 and result.attainment[20.0] == 1.0:
                break
            result = sweep()
    finally:
        server.stop()
    assert result.attainment[10.0] == 1.0 and result.attainment[20.0] == 1.0
    assert result.attainment[1000.0] <= 0.5 + 1 / 12
    assert result.max_rate == 20.0


def test_cli_writes_json_and_plots(steady: str, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    plots = tmp_path / "plots"
    cmd = [
        sys.executable, "-m", "pdserve.bench", "--base-url", steady, "--num-requests", "6",
        "--request-rate", "50", "--input-len", "8", "--output-len", "4", "--warmup", "2",
        "--slo", "ttft_ms=500,tpot_ms=100", "--sweep", "30,60", "--output", str(out), "--plots", str(plots),
        "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Highest rate with ≥ 90 % SLO attainment: 60 req/s" in proc.stdout
    assert "TTFT" in proc.stdout and "Goodput" in proc.stdout
    result = json.loads(out.read_text())
    assert result["config"]["model"] == "fake"  # found through /v1/models
    assert result["sweep"]["max_rate"] == 60.0
    assert [r["rate"] for r in result["runs"]] == [30.0, 60.0]
    first = result["runs"][0]
    assert first["summary"]["num_requests"] == 6 and len(first["requests"]) == 8
    assert sum(r["warmup"] for r in first["requests"]) == 2
    assert {"ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "chunk_ms"} <= set(first["requests"][0])
    assert result["machine"]["load_avg_1_5_15min"]
    # The HTML report: self-contained (inline SVG, nothing fetched), the dashboard's charts for each rate.
    report = (plots / "report.html").read_text()
    assert "report written to" in proc.stdout
    for chart in ("Requests finished / s", "Tokens / s", "TTFT — 30 req/s", "ITL — 60 req/s", "TTFT CDF",
                  "SLO attainment and goodput vs rate"):
        assert chart in report
    assert report.count("<svg") >= 2 * 6 + 5 and "<polyline" in report and ">SLO<" in report
    assert "src=" not in report and "href=" not in report and "<script" not in report
    pytest.importorskip("matplotlib")
    assert {p.name for p in plots.iterdir()} == {
        "report.html",
        "latency_cdf.png",
        "itl_over_time.png",
        "attainment_vs_rate.png",
    }


def test_cli_reports_bad_options_without_a_traceback() -> None:
    cmd = [sys.executable, "-m", "pdserve.bench", "--input-len", "uniform:9", "--model", "m", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "error: cannot read length 'uniform:9'" in proc.stderr and "Traceback" not in proc.stderr


def test_warmup_in_seconds_counts_from_the_actual_sends(steady: str) -> None:
    # all arrivals are due at once; 2 slots; each request takes 190 ms: the first 2 start inside the
    # 0.1 s warm-up, the next 5 (the measured ones) after it
    run = bench(steady, num_requests=5, rate=math.inf, output_len=8, max_concurrency=2, warmup_s=0.1)
    assert [r.warmup for r in run.records] == [True, True] + [False] * 5
    assert run.summary.num_requests == 5 and run.summary.num_ok == 5


def test_png_plots_are_skipped_with_a_clear_message_without_matplotlib(steady: str, tmp_path: Path) -> None:
    blocker = tmp_path / "site" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('matplotlib is not installed here')\n")
    cmd = [
        sys.executable, "-m", "pdserve.bench", "--base-url", steady, "--num-requests", "2",
        "--input-len", "4", "--output-len", "2", "--plots", str(tmp_path / "plots"), "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "plots need matplotlib: pip install 'pdserve[bench]'" in proc.stderr
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["report.html"]  # drawn without matplotlib
