"""Ready means ready (the start-up gate) and the router's side of scaling (targets, drains, flips)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from router_fakes import MODEL, TOKENIZER, FakeBackend

from pdserve.config import Role
from pdserve.router.app import create_app
from pdserve.router.deployment import Deployment
from pdserve.router.dispatch_config import DispatcherConfig
from pdserve.router.dispatcher import Dispatcher
from pdserve.router.errors import APIError
from pdserve.router.metrics import RouterMetrics
from pdserve.router.registry import Registry, WorkerInfo
from pdserve.worker import protocol as p

pytestmark = pytest.mark.anyio

BODY = {"model": MODEL, "prompt": "hi", "max_tokens": 4}


async def client_for(backend: FakeBackend, **kw: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(backend, TOKENIZER, served_model_name=MODEL, **kw)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=10) as c:
        yield c


async def test_models_answer_503_until_the_first_serving_path_then_stay_200() -> None:
    backend = FakeBackend(ready=False)
    async for c in client_for(backend):
        reply = await c.get("/v1/models")
        assert reply.status_code == 503 and "Retry-After" in reply.headers
        backend.ready = True
        assert (await c.get("/v1/models")).status_code == 200
        backend.ready = False  # every worker lost later: the model is still listed
        assert (await c.get("/v1/models")).status_code == 200


async def test_a_request_during_start_up_waits_for_the_first_path() -> None:
    backend = FakeBackend(ready=False)
    async for c in client_for(backend, startup_wait_s=30.0):
        pending = asyncio.create_task(c.post("/v1/completions", json=BODY))
        await asyncio.sleep(0.3)
        assert not pending.done() and not backend.calls
        backend.ready = True
        reply = await pending
        assert reply.status_code == 200 and len(backend.calls) == 1


async def test_start_up_wait_is_bounded_and_later_outages_do_not_wait() -> None:
    backend = FakeBackend(ready=False)
    async for c in client_for(backend, startup_wait_s=0.2):
        reply = await c.post("/v1/completions", json=BODY)
        assert reply.status_code == 503 and "Retry-After" in reply.headers and not backend.calls
        assert "starting" in reply.json()["error"]["message"]
        backend.ready = True
        assert (await c.post("/v1/completions", json=BODY)).status_code == 200
        backend.ready = False
        start = time.monotonic()
        await c.post("/v1/completions", json=BODY)  # the backend itself answers (no wait at the gate)
        assert time.monotonic() - start < 0.2 and len(backend.calls) == 2


async def test_a_request_during_a_reshape_waits_for_the_path_instead_of_failing() -> None:
    """2 mixed → 1 prefill + 1 decode flips both workers: no path for a moment, and no 503 for it."""
    backend = FakeBackend(ready=True)
    changing = {"now": False}
    async for c in client_for(backend, startup_wait_s=30.0):
        c._transport.app.state.gate.is_changing = lambda: changing["now"]  # type: ignore[attr-defined]
        assert (await c.post("/v1/completions", json=BODY)).status_code == 200
        backend.ready, changing["now"] = False, True  # both workers flipping
        pending = asyncio.create_task(c.post("/v1/completions", json=BODY))
        await asyncio.sleep(0.3)
        assert not pending.done() and len(backend.calls) == 1
        backend.ready = True  # the flipped pair registered
        assert (await pending).status_code == 200 and len(backend.calls) == 2
        changing["now"] = False
        backend.ready = False  # an outage with no reshape under way: the backend answers at once
        start = time.monotonic()
        await c.post("/v1/completions", json=BODY)
        assert time.monotonic() - start < 0.2 and len(backend.calls) == 3


def test_a_deployment_is_changing_while_a_slot_flips_or_starts() -> None:
    d = deployment(mixed=2)
    assert not d.changing()
    slots = [{"worker_id": "mixed-0", "role": "mixed", "state": "ready"},
             {"worker_id": "mixed-1", "role": "mixed", "state": "flipping", "flip_to": "decode"}]
    d.sync({"launcher": "local", "targets": {"prefill": 1, "decode": 1, "mixed": 0}, "slots": slots})
    assert d.changing()
    slots[1]["state"] = "ready"
    d.sync({"launcher": "local", "targets": {"prefill": 1, "decode": 1, "mixed": 0}, "slots": slots})
    assert not d.changing()


DISPATCHERS: list[Dispatcher] = []


@pytest.fixture(autouse=True)
def close_dispatchers() -> Iterator[None]:
    """A dispatcher's zmq socket must be closed (its context blocks at garbage collection otherwise)."""
    yield
    while DISPATCHERS:
        DISPATCHERS.pop().channel.close()


def dispatcher() -> Dispatcher:
    DISPATCHERS.append(Dispatcher(DispatcherConfig(), "tiny", 128))
    return DISPATCHERS[-1]


def deployment(**workers: int) -> Deployment:
    dispatcher_ = dispatcher()
    for role, n in workers.items():
        for i in range(n):
            dispatcher_.registry.add(WorkerInfo(f"{role}-{i}", Role(role), "tiny", 1, "h", 128, 16, 8, None))
    d = Deployment(dispatcher_, secret="s")
    d.sync({"launcher": "local", "targets": {"prefill": 1, "decode": 2, "mixed": 0}, "slots": []})
    return d


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"prefill": -1}, 400),
        ({"gpu": 2}, 400),
        ({"decode": 1.5}, 400),
        ({"decode": True}, 400),
        ({"prefill": 0}, 400),  # decode workers alone are no serving path
        ({"prefill": 0, "decode": 0}, 400),
        ({"prefill": 1000}, 400),
        ({}, 400),
        ([1], 400),
    ],
)
def test_bad_scale_requests_change_nothing(body: object, status: int) -> None:
    d = deployment(prefill=1, decode=2)
    before = (dict(d.targets or {}), d.generation)
    with pytest.raises(APIError) as err:
        d.scale(body)
    assert err.value.status == status
    assert (d.targets, d.generation) == before


def test_scale_needs_a_supervisor() -> None:
    d = Deployment(dispatcher())
    with pytest.raises(APIError) as err:
        d.scale({"decode": 3})
    assert err.value.status == 409


def test_scale_sets_targets_and_the_supervisor_gets_them() -> None:
    d = deployment(prefill=1, decode=2)
    assert d.scale({"decode": 3})["targets"] == {"prefill": 1, "decode": 3, "mixed": 0}
    assert d.scale({"prefill": 0, "decode": 0, "mixed": 2})["targets"]["mixed"] == 2  # to aggregated
    reply = d.sync({"targets": {"prefill": 1, "decode": 2, "mixed": 0}, "slots": []})
    assert reply["targets"] == {"prefill": 0, "decode": 0, "mixed": 2} and reply["generation"] == 3


async def test_drain_and_flip_take_the_worker_out_of_routing_at_once() -> None:
    d = deployment(prefill=1, decode=2)
    d.sync({"slots": [], "drain": ["decode-0"], "flip": {"decode-1": "prefill"}})
    reg = d.dispatcher.registry
    assert reg.get("decode-0").draining and reg.get("decode-1").draining  # type: ignore[union-attr]
    assert reg.by_role(Role.DECODE) == [] and not reg.ready
    view = d.view()
    assert view["pools"]["decode"] == {"target": 2, "actual": 0, "states": {}}


# -- the threads target (docs/scaling.md) -------------------------------------------------------


@pytest.mark.parametrize("threads", [0, -1, 257, 1.5, "2", True, None, [2]])
def test_a_bad_threads_target_is_refused_and_changes_nothing(threads: object) -> None:
    d = deployment(prefill=1, decode=2)
    d.scale({"threads": 2})
    before = (dict(d.targets or {}), d.threads_target, d.generation)
    with pytest.raises(APIError) as err:
        d.scale({"decode": 3, "threads": threads})
    assert err.value.status == 400 and err.value.param == "threads"
    assert (d.targets, d.threads_target, d.generation) == before


def test_the_threads_target_is_set_kept_and_reported() -> None:
    d = deployment(prefill=1, decode=2)
    assert d.threads_target is None and d.view()["threads"] is None  # as each worker was started
    reply = d.scale({"threads": 2})  # threads alone: the pools stay
    assert reply["threads"] == 2 and reply["previous_threads"] is None
    assert reply["targets"] == reply["previous"] == {"prefill": 1, "decode": 2, "mixed": 0}
    reply = d.scale({"decode": 3})  # no "threads": the target stays
    assert reply["threads"] == reply["previous_threads"] == 2 and reply["targets"]["decode"] == 3
    reply = d.scale({"threads": 256})
    assert (reply["threads"], reply["previous_threads"]) == (256, 2)
    assert d.view()["threads"] == 256
    synced = d.sync({"targets": {"prefill": 1, "decode": 2, "mixed": 0}, "threads": 1, "slots": []})
    assert synced["threads"] == 256  # the router's target wins over the supervisor's once it has one


def test_a_new_router_takes_the_supervisors_threads_target() -> None:
    d = Deployment(dispatcher())
    assert d.sync({"targets": {"mixed": 2}, "threads": 3, "slots": []})["threads"] == 3
    d = Deployment(dispatcher())
    assert d.sync({"targets": {"mixed": 2}, "threads": None, "slots": []})["threads"] is None


def test_set_threads_reaches_the_registered_worker_and_its_reported_count_is_shown() -> None:
    d = deployment(mixed=2)
    sent: list[tuple[str, object]] = []
    d.dispatcher.channel.send = lambda wid, m: sent.append((wid, m)) or True  # type: ignore[method-assign]
    reply = d.sync({"slots": [], "set_threads": {"mixed-0": 2, "gone": 2, "mixed-1": 0}})
    assert sent == [("mixed-0", p.SetThreads(2))]  # unknown workers and bad counts are dropped
    assert [w["threads"] for w in reply["workers"]] == [0, 0]  # nothing reported yet
    reg = d.dispatcher.registry
    reg.heartbeat("mixed-0", p.WorkerLoad(threads=2))
    reply = d.sync({"slots": []})
    assert {w["worker_id"]: w["threads"] for w in reply["workers"]} == {"mixed-0": 2, "mixed-1": 0}
    metrics = RouterMetrics()
    metrics.attach(d.dispatcher)
    text = metrics.render().decode()
    assert 'pdserve_worker_threads{role="mixed",worker="mixed-0"} 2.0' in text


def _busy(load: p.WorkerLoad, threads: int, steps: int) -> p.WorkerLoad:
    """``load`` after ``steps`` more prefill and decode steps (0.1 s each), at ``threads``."""
    return p.WorkerLoad(
        num_prefill_tokens=load.num_prefill_tokens + 100 * steps,
        prefill_busy_s=load.prefill_busy_s + 0.1 * steps,
        num_prefill_steps=load.num_prefill_steps + steps, num_decode_steps=load.num_decode_steps + steps,
        decode_busy_s=load.decode_busy_s + 0.1 * steps, num_decode_seqs=load.num_decode_seqs + 2 * steps,
        threads=threads,
    )


def test_a_changed_thread_count_drops_the_workers_measured_speed_but_not_its_queue() -> None:
    reg = Registry()
    reg.add(WorkerInfo("mixed-0", Role.MIXED, "tiny", 1, "h", 128, 16, 8, None, threads=1))
    info = reg.get("mixed-0")
    assert info is not None
    load = _busy(p.WorkerLoad(), 1, 0)
    for _ in range(3):
        load = _busy(load, 1, 5)
        reg.heartbeat("mixed-0", load)
    assert info.perf.prefill_rate_tps == pytest.approx(1000) and info.perf.decode_step_s is not None
    info.perf.charge(500, 0.0)
    load = _busy(load, 2, 5)  # a heartbeat that reports 2 threads now
    reg.heartbeat("mixed-0", load)
    assert info.threads == 2 and info.perf.prefill_rate_tps is None and info.perf.decode_step_s is None
    assert info.perf.prefill_fit.weight == 0 and info.perf.queued_prefill_tokens == 500
    load = _busy(load, 2, 5)  # learned afresh from the next interval on
    reg.heartbeat("mixed-0", load)
    assert info.perf.prefill_rate_tps == pytest.approx(1000)
    reg.heartbeat("mixed-0", _busy(load, 2, 5))  # the same count again: nothing forgotten
    assert info.perf.prefill_rate_tps == pytest.approx(1000) and info.perf.decode_step_s is not None
