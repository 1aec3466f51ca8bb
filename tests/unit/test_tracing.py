"""RequestTrace and Tracer on a hand-driven clock: event placement, the TTFT breakdown, metrics, log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from pdserve.router.tracing import RequestTrace, Tracer
from pdserve.worker.protocol import PrefillTiming


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def at(self, offset_ms: float) -> None:
        self.t = 100.0 + offset_ms / 1e3


def run_trace(clock: Clock, timing: PrefillTiming | None) -> RequestTrace:
    """Arrive at 0, route at 2 ms, first token received at 50 ms, handed over at 52 ms, done at 80 ms."""
    trace = RequestTrace("r-0", clock=clock)
    clock.at(2)
    trace.routed(0, "prefill-0", "decode-0")
    clock.at(50)
    trace.first_token("prefill-0", timing)
    clock.at(52)
    trace.tokens(1)
    clock.at(55)
    trace.kv_received(4096, 0.004)
    clock.at(60)
    trace.tokens(3)
    clock.at(80)
    trace.end("finished", "length")
    return trace


# Worker: received → 5 ms queue → 30 ms compute + 3 ms pushing KV → report at 40 ms; first push at 10 ms.
TIMING = PrefillTiming(queue_s=0.005, prefill_s=0.030, kv_push_s=0.003, span_s=0.040, kv_push_start_s=0.010)


def test_breakdown_splits_the_ttft_into_parts_that_add_up() -> None:
    trace = run_trace(Clock(), TIMING)
    b = trace.breakdown
    assert b is not None and b.exact
    assert b.ttft_s == pytest.approx(0.052)
    assert b.router_queue_s == pytest.approx(0.002) and b.worker_queue_s == pytest.approx(0.005)
    assert b.queue_s == pytest.approx(0.007)
    assert b.prefill_s == pytest.approx(0.030) and b.transfer_s == pytest.approx(0.003)
    # 48 ms between dispatch and receipt, 38 of them accounted for by the worker: 10 ms of hops.
    assert b.network_s == pytest.approx(0.010) and b.router_delivery_s == pytest.approx(0.002)
    assert b.delivery_s == pytest.approx(0.012)
    assert sum(b.parts().values()) == pytest.approx(b.ttft_s)


def test_worker_events_are_placed_between_symmetric_hops() -> None:
    trace = run_trace(Clock(), TIMING)
    d = trace.to_dict()
    times = {e["event"]: e["t_s"] for e in d["events"]}
    # hops: (48 - 40) / 2 = 4 ms each way → the worker received it at 6 ms.
    assert times["prefill_start"] == pytest.approx(0.011)
    assert times["kv_transfer_start"] == pytest.approx(0.016)
    assert times["prefill_end"] == pytest.approx(0.044)
    assert times["first_token"] == pytest.approx(0.050)
    assert times["first_token_delivered"] == pytest.approx(0.052)
    assert times["kv_transfer_end"] == pytest.approx(0.055)
    assert times["finished"] == pytest.approx(0.080)
    assert [e["t_s"] for e in d["events"]] == sorted(e["t_s"] for e in d["events"])
    assert d["num_tokens"] == 4 and d["num_token_messages"] == 2 and d["last_token_s"] == pytest.approx(0.06)
    assert d["e2e_s"] == pytest.approx(0.08) and d["outcome"] == "finished" and d["attempts"] == 1
    kv_end = next(e for e in d["events"] if e["event"] == "kv_transfer_end")
    assert kv_end["bytes"] == 4096 and kv_end["transfer_s"] == 0.004
    assert json.loads(json.dumps(d)) == d  # JSON-ready


def test_a_transfer_that_began_after_the_first_token_gets_an_estimated_start() -> None:
    clock = Clock()
    trace = run_trace(clock, PrefillTiming(queue_s=0.005, prefill_s=0.030, kv_push_s=0, span_s=0.040))
    d = trace.to_dict()
    start = next(e for e in d["events"] if e["event"] == "kv_transfer_start")
    assert start["t_s"] == pytest.approx(0.055 - 0.004) and start["estimated"] is True


def test_events_are_recorded_once() -> None:
    clock = Clock()
    trace = run_trace(clock, TIMING)
    clock.at(90)
    trace.first_token("decode-1", TIMING)  # a later attempt's first message: not a first token
    trace.end("aborted")
    names = [e["event"] for e in trace.to_dict()["events"]]
    assert names.count("first_token") == 1 and "aborted" not in names
    assert trace.outcome == "finished"


def test_timing_that_arrives_after_the_first_token_still_counts() -> None:
    # The decode worker relayed the first token at 50 ms; the prefill worker's own message
    # (its timing) arrived at 51 ms, after the token had been handed over at 50.5 ms.
    clock = Clock()
    trace = RequestTrace("r-2", clock=clock)
    clock.at(2)
    trace.routed(0, "prefill-0", "decode-0")
    clock.at(50)
    trace.first_token("decode-0", None)
    clock.at(50.5)
    trace.tokens(1)
    clock.at(51)
    trace.first_token("prefill-0", TIMING)
    b = trace.breakdown
    assert b is not None and b.exact
    assert b.ttft_s == pytest.approx(0.0505) and b.prefill_s == pytest.approx(0.030)
    assert b.network_s == pytest.approx(0.048 - 0.038) and b.router_delivery_s == pytest.approx(0.0005)
    assert sum(b.parts().values()) == pytest.approx(b.ttft_s)
    firsts = [e for e in trace.to_dict()["events"] if e["event"] == "first_token"]
    assert len(firsts) == 1 and firsts[0]["worker"] == "decode-0"


def test_without_worker_timing_the_prefill_takes_everything_between_dispatch_and_receipt() -> None:
    b = run_trace(Clock(), None).breakdown
    assert b is not None and not b.exact
    assert b.queue_s == pytest.approx(0.002) and b.prefill_s == pytest.approx(0.048)
    assert b.transfer_s == 0 and b.delivery_s == pytest.approx(0.002)
    assert sum(b.parts().values()) == pytest.approx(b.ttft_s)


def test_a_failed_generation_has_no_breakdown() -> None:
    clock = Clock()
    trace = RequestTrace("r-1", clock=clock)
    trace.routed(0, "prefill-0", "decode-0")
    trace.routed(1, "prefill-1", "decode-0")
    clock.at(10)
    trace.end("error")
    d = trace.to_dict()
    assert d["ttft_breakdown"] is None and d["outcome"] == "error" and d["attempts"] == 2
    assert [e["event"] for e in d["events"]] == ["arrived", "routed", "routed", "error"]


def test_tracer_observes_metrics_keeps_recent_and_logs(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    log = tmp_path / "traces.jsonl"
    clock = Clock()
    tracer = Tracer(registry, keep=2, log_path=str(log), clock=clock)
    for i in range(3):
        clock.at(0)
        trace = tracer.start(f"r-{i}")
        trace.routed(0, "p", "d")
        clock.at(50)
        trace.first_token("p", TIMING)
        clock.at(52)
        trace.tokens(1)
        clock.at(70 + i)
        trace.end("finished" if i < 2 else "aborted")
    tracer.close()

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert sample("pdserve_time_to_first_token_seconds_count") == 3
    assert sample("pdserve_time_to_first_token_seconds_sum") == pytest.approx(3 * 0.052)
    assert sample("pdserve_ttft_breakdown_seconds_sum", part="prefill") == pytest.approx(3 * 0.030)
    assert sample("pdserve_ttft_breakdown_seconds_sum", part="transfer") == pytest.approx(3 * 0.003)
    parts = sum(
        sample("pdserve_ttft_breakdown_seconds_sum", part=p) or 0.0
        for p in ("queue", "prefill", "transfer", "delivery")
    )
    assert parts == pytest.approx(3 * 0.052)
    assert sample("pdserve_e2e_request_latency_seconds_count") == 2  # the aborted one is not an E2E
    assert [t["request_id"] for t in tracer.recent()] == ["r-1", "r-2"]
    assert [t["request_id"] for t in tracer.recent(1)] == ["r-2"] and tracer.recent(0) == []
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [t["request_id"] for t in lines] == ["r-0", "r-1", "r-2"]
    assert lines[2]["outcome"] == "aborted"
