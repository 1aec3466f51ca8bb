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
from pdserve.router.registry import WorkerInfo

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
