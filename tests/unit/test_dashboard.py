"""The dashboard's data: its shape, the sampler's arithmetic, worker events, its cost, and the key rules."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdserve.config import Role
from pdserve.router.dashboard import Dashboard, SLOConfig
from pdserve.router.dashboard.sampler import bucket_quantile
from pdserve.router.dispatch_config import DispatcherConfig
from pdserve.router.dispatcher import Dispatcher
from pdserve.router.registry import WorkerInfo
from pdserve.router.server import RouterConfig, build_router_app
from pdserve.router.tracing import Tracer
from pdserve.worker.protocol import PrefillTiming, WorkerLoad

TIMING = PrefillTiming(queue_s=0.001, prefill_s=0.004, kv_push_s=0.001, span_s=0.007)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def worker(wid: str, role: Role, pid: int = 1, **load: int) -> WorkerInfo:
    return WorkerInfo(
        worker_id=wid,
        role=role,
        model="tiny",
        pid=pid,
        host_id="hostA/boot/7",
        max_model_len=128,
        block_size=16,
        num_blocks=64,
        kv=None,
        load=WorkerLoad(num_total_blocks=64, num_free_blocks=64, **load),
    )


_DISPATCHERS: list[Dispatcher] = []


@pytest.fixture(autouse=True)
def close_dispatchers() -> Iterator[None]:
    """Close each test's (never started) dispatcher socket: a ZeroMQ context left to the GC can hang."""
    yield
    while _DISPATCHERS:
        _DISPATCHERS.pop().channel.close()


def setup(slo: SLOConfig | None = None) -> tuple[Dispatcher, Tracer, Dashboard, Clock]:
    dispatcher = Dispatcher(DispatcherConfig(), model_name="tiny", max_model_len=128)
    _DISPATCHERS.append(dispatcher)
    clock = Clock()
    tracer = Tracer(dispatcher.metrics.registry, clock=clock)
    dash = Dashboard(dispatcher, tracer, slo, window_s=5.0)
    return dispatcher, tracer, dash, clock


def serve_one(tracer: Tracer, clock: Clock, rid: str, kv_bytes: int = 4096, ttft_s: float = 0.02) -> None:
    """One generation's trace, as the dispatcher and HTTP side would record it."""
    trace = tracer.start(rid)
    clock.t += 0.001
    trace.routed(0, "prefill-0", "decode-0")
    clock.t += ttft_s - 0.002
    trace.first_token("prefill-0", TIMING)
    clock.t += 0.001
    trace.tokens(1)
    trace.kv_received(kv_bytes, 0.001)
    clock.t += 0.05
    trace.tokens(4)
    trace.end("finished", "length")


def test_data_has_the_documented_shape() -> None:
    dispatcher, tracer, dash, clock = setup(SLOConfig(ttft_ms=500, itl_ms=50))
    dispatcher.registry.add(worker("prefill-0", Role.PREFILL, num_running=2, num_cached_blocks=5))
    dispatcher.registry.add(worker("decode-0", Role.DECODE, num_waiting_for_kv=1))
    dash.fleet.observe()
    for i in range(3):
        serve_one(tracer, clock, f"r{i}")
    dispatcher.metrics.requests.labels("finished").inc(3)
    dispatcher.metrics.generation_tokens.inc(15)
    for gap_s in (0.004, 0.006, 0.02):
        dispatcher.metrics.itl.observe(gap_s)
    dash.sampler.tick(now_s=10.0)
    data = json.loads(json.dumps(dash.data()))  # plain JSON
    assert set(data) == {
        "version",
        "now",
        "router",
        "pools",
        "workers",
        "flows",
        "samples",
        "events",
        "traces",
        "seq",
    }
    assert data["router"]["slo"] == {"ttft_ms": 500, "itl_ms": 50}
    assert data["router"]["totals"]["finished"] == 3 and data["router"]["totals"]["tokens"] == 15
    one = {"actual": 1, "target": None}
    assert data["pools"] == {"prefill": one, "decode": one}
    w = {x["id"]: x for x in data["workers"]}
    assert w["prefill-0"]["running"] == 2 and w["prefill-0"]["kv_cached"] == 5
    assert w["prefill-0"]["host"] == "hostA"
    assert w["decode-0"]["waiting_kv"] == 1 and w["decode-0"]["state"] == "ready"
    assert data["flows"] == [
        {"src": "prefill-0", "dst": "decode-0", "bytes_s": round(3 * 4096 / 5.0, 1), "requests": 3}
    ]
    [sample] = data["samples"]
    assert sample["num_ended"] == 3 and sample["ttft_p50_ms"] == pytest.approx(20.0, abs=0.01)
    assert set(sample["ttft_parts_ms"]) == {"queue", "prefill", "transfer", "delivery"}
    assert sample["ttft_parts_ms"]["prefill"] == pytest.approx(4.0)
    assert 1.0 <= sample["itl_p50_ms"] <= 10.0 and sample["itl_p99_ms"] <= 25.0
    assert [t["request_id"] for t in data["traces"]] == ["r0", "r1", "r2"]
    assert {e["kind"] for e in data["events"]} == {"worker_registered"}
    assert data["seq"] == {"samples": 1, "events": 2, "traces": 3}


def test_rates_are_taken_over_the_window() -> None:
    dispatcher, _, dash, _ = setup()
    finished = dispatcher.metrics.requests.labels("finished")
    for second in range(10):
        finished.inc(4)  # 4 requests per second
        sample = dash.sampler.tick(now_s=float(second))
    assert sample["req_s"] == pytest.approx(4.0)
    assert dash.sampler.tick(now_s=10.0)["req_s"] == pytest.approx(16 / 5)  # none in the last second
    assert dash.sampler.tick(now_s=14.0)["req_s"] == pytest.approx(0.0)  # none in the window


def test_incremental_reads_return_only_what_is_new() -> None:
    _, tracer, dash, clock = setup()
    for i in range(5):
        dash.sampler.tick(now_s=float(i))
    serve_one(tracer, clock, "a")
    dash.sampler.tick(now_s=5.0)
    data = dash.data(samples_after=5, events_after=dash.events.last_seq, traces_after=0)
    assert [s["seq"] for s in data["samples"]] == [6]
    assert [t["request_id"] for t in data["traces"]] == ["a"] and data["events"] == []
    again = dash.data(**{f"{k}_after": v for k, v in data["seq"].items()})
    assert again["samples"] == [] and again["traces"] == [] and again["events"] == []


def test_workers_lost_draining_and_replaced_become_events() -> None:
    dispatcher, _, dash, _ = setup()
    reg = dispatcher.registry
    reg.add(worker("decode-0", Role.DECODE, pid=10))
    reg.add(worker("decode-1", Role.DECODE, pid=11))
    dash.fleet.observe()
    reg.remove("decode-1")  # as the dispatcher does when its process is killed
    reg.get("decode-0").draining = True  # type: ignore[union-attr]
    data = dash.data()
    states = {w["id"]: w["state"] for w in data["workers"]}
    assert states == {"decode-0": "draining", "decode-1": "lost"}
    assert data["pools"]["decode"]["actual"] == 0  # serving: neither the draining nor the lost one
    kinds = [(e["kind"], e.get("worker")) for e in data["events"]]
    assert ("worker_lost", "decode-1") in kinds and ("worker_draining", "decode-0") in kinds
    reg.add(worker("decode-1", Role.DECODE, pid=12))  # a supervisor restarted it
    data = dash.data(events_after=data["seq"]["events"])
    events = [(e["kind"], e["worker"], e["pid"]) for e in data["events"]]
    assert events == [("worker_replaced", "decode-1", 12)]
    assert {w["id"]: w["state"] for w in data["workers"]}["decode-1"] == "ready"
    reg.remove("decode-0")  # it was draining: a clean exit, not a loss
    data = dash.data(events_after=data["seq"]["events"])
    assert [e["kind"] for e in data["events"]] == ["worker_left"]


def test_recovery_counters_become_events() -> None:
    dispatcher, _, dash, _ = setup()
    dash.fleet.observe()
    dispatcher.counters.num_migrations += 2
    dispatcher.counters.num_retries += 3
    data = dash.data()
    assert {(e["kind"], e["count"]) for e in data["events"]} == {("migration", 2), ("retry", 3)}


def test_bucket_quantile_interpolates_like_prometheus() -> None:
    buckets = [(0.01, 0.0), (0.02, 50.0), (0.05, 100.0), (math.inf, 100.0)]
    assert bucket_quantile(0.5, buckets) == pytest.approx(0.02)
    assert bucket_quantile(0.25, buckets) == pytest.approx(0.015)
    assert bucket_quantile(0.99, buckets) == pytest.approx(0.02 + 0.03 * 49 / 50)
    assert bucket_quantile(0.99, [(0.01, 0.0), (math.inf, 10.0)]) == 0.01  # in +Inf: the last bound
    assert math.isnan(bucket_quantile(0.5, [(0.01, 0.0), (math.inf, 0.0)]))


def test_it_stays_cheap_whatever_the_history() -> None:
    """Bounded memory, bounded answers, no message to any worker, one list append per request."""
    dispatcher, tracer, dash, clock = setup()
    for i in range(8):
        dispatcher.registry.add(worker(f"decode-{i}", Role.DECODE))
    sent: list[Any] = []
    dispatcher.channel.send = lambda *a: sent.append(a) or True  # type: ignore[method-assign]
    for second in range(600):
        for j in range(3):
            serve_one(tracer, clock, f"r{second}-{j}")
        assert len(dash.sampler._pending) == 3  # the listener only queued them
        dash.sampler.tick(now_s=float(second))
        dash.fleet.observe()
    assert len(dash.sampler.samples) == 300  # the ring's size: five minutes of samples
    assert len(dash.sampler._window) <= 3 * 6 and len(dash.sampler.traces) <= 50
    first = dash.data()  # a page opening: at most the kept samples and 20 traces
    assert len(first["samples"]) == 300 and len(first["traces"]) == 20
    assert len(json.dumps(first)) < 200_000
    dash.sampler.tick(now_s=601.0)
    update = dash.data(**{f"{k}_after": v for k, v in first["seq"].items()})  # a refresh: what is new
    assert len(update["samples"]) == 1 and len(json.dumps(update)) < 8_000
    assert sent == []


def test_slo_must_be_positive() -> None:
    with pytest.raises(ValueError, match="slo ttft_ms"):
        SLOConfig(ttft_ms=0)


# -- the routes, with an API key ----------------------------------------------------------


@pytest.mark.anyio
async def test_key_by_query_or_cookie_only_on_the_dashboard() -> None:
    app, _ = build_router_app(RouterConfig(model="tiny", api_keys=("sekrit",), slo_ttft_ms=300))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/dashboard")).status_code == 401
        assert (await client.get("/dashboard?key=wrong")).status_code == 401
        page = await client.get("/dashboard?key=sekrit")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "<svg" not in page.text[:200] and "pdserve dashboard" in page.text
        assert "connect-src 'self'" in page.headers["content-security-policy"]
        assert "/*JS*/" not in page.text and "/*CSS*/" not in page.text  # inlined
        assert "pdserve_key" in page.headers["set-cookie"] and "HttpOnly" in page.headers["set-cookie"]
        data = await client.get("/pdserve/dashboard/data")  # the cookie alone
        assert data.status_code == 200 and data.json()["router"]["slo"]["ttft_ms"] == 300
        # The cookie or a query key opens nothing else.
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/v1/models?key=sekrit")).status_code == 401
        client.cookies.clear()
        assert (await client.get("/pdserve/dashboard/data")).status_code == 401
        headers = {"Authorization": "Bearer sekrit"}
        assert (await client.get("/pdserve/dashboard/data", headers=headers)).status_code == 200


def test_a_supervised_deployment_adds_targets_slots_and_scaling_events() -> None:
    dispatcher = Dispatcher(DispatcherConfig(), model_name="tiny", max_model_len=128)
    _DISPATCHERS.append(dispatcher)
    view: dict[str, Any] = {
        "supervised": True,
        "launcher": "local",
        "pools": {"prefill": {"target": 1}, "decode": {"target": 2}, "mixed": {"target": 0}},
        "workers": [
            {
                "worker_id": "decode-0",
                "role": "decode",
                "state": "ready",
                "host": "h1",
                "pid": 10,
                "restarts": 0,
            },
            {
                "worker_id": "decode-1",
                "role": "decode",
                "state": "starting",
                "host": "h1",
                "pid": 11,
                "restarts": 0,
            },
        ],
    }
    dash = Dashboard(dispatcher, Tracer(), deployment=lambda: view)
    dispatcher.registry.add(worker("decode-0", Role.DECODE, pid=10))
    data = dash.data()
    states = {w["id"]: (w["state"], w.get("slot_state")) for w in data["workers"]}
    assert states == {"decode-0": ("ready", "ready"), "decode-1": ("starting", "starting")}
    assert data["pools"]["decode"] == {"actual": 1, "target": 2} and data["router"]["supervised"] is True
    assert ("worker_starting", "decode-1") in [(e["kind"], e.get("worker")) for e in data["events"]]
    # decode-0 is killed: the router loses it, the supervisor restarts it, the targets change.
    dispatcher.registry.remove("decode-0")
    view["workers"][0] = {**view["workers"][0], "state": "restarting", "restarts": 1}
    view["pools"]["decode"] = {"target": 3}
    data = dash.data(events_after=data["seq"]["events"])
    w = {x["id"]: x for x in data["workers"]}["decode-0"]
    assert (w["state"], w["slot_state"], w["restarts"]) == ("lost", "restarting", 1)
    kinds = {e["kind"]: e for e in data["events"]}
    assert {"worker_lost", "worker_restarting", "scaled"} <= set(kinds)
    assert kinds["scaled"]["detail"] == "decode 2 → 3"
    dispatcher.registry.add(worker("decode-0", Role.DECODE, pid=20))  # the restarted process registers
    view["workers"][0] = {**view["workers"][0], "state": "ready", "pid": 20}
    data = dash.data(events_after=data["seq"]["events"])
    assert [e["kind"] for e in data["events"]] == ["worker_replaced"]
    assert {x["id"]: x["state"] for x in data["workers"]}["decode-0"] == "ready"


def test_routing_decisions_by_reason_per_sample() -> None:
    dispatcher, _, dash, _ = setup()
    dash.sampler.tick(now_s=0.0)
    dispatcher.placer.decisions["remote_cheaper"] += 3
    dispatcher.placer.decisions["local_short"] += 1
    assert dash.sampler.tick(now_s=1.0)["placements"] == {"remote_cheaper": 3, "local_short": 1}
    assert dash.sampler.tick(now_s=2.0)["placements"] == {}
