"""Worker registry leases and routing policies."""

from __future__ import annotations

import pytest

from pdserve.config import Role
from pdserve.router.policy import LeastLoaded, RoundRobin, make_policy
from pdserve.router.registry import Registry, WorkerInfo
from pdserve.worker.protocol import Register, WorkerLoad


def worker(wid: str, role: Role = Role.DECODE, inflight: int = 0, free: int = 10) -> WorkerInfo:
    info = WorkerInfo.from_register(
        Register(
            worker_id=wid,
            role=role.value,
            model="tiny",
            pid=1,
            host_id="h",
            max_model_len=64,
            block_size=16,
            num_blocks=10,
        )
    )
    info.num_inflight = inflight
    info.load = WorkerLoad(num_free_blocks=free, num_total_blocks=10)
    return info


def test_registry_readiness_and_roles() -> None:
    reg = Registry(lease_s=1.0)
    assert not reg.ready
    reg.add(worker("p", Role.PREFILL))
    assert not reg.ready
    reg.add(worker("d", Role.DECODE))
    assert reg.ready and reg.disaggregated_ready
    assert [w.worker_id for w in reg.by_role(Role.PREFILL)] == ["p"]
    reg.remove("p")
    assert not reg.ready
    reg.add(worker("m", Role.MIXED))
    assert reg.ready and not reg.disaggregated_ready


def test_registry_lease_expiry_and_heartbeat() -> None:
    reg = Registry(lease_s=1.0)
    a, b = worker("a"), worker("b")
    reg.add(a)
    reg.add(b)
    assert reg.heartbeat("a", WorkerLoad(num_running=3))
    assert a.load.num_running == 3
    assert not reg.heartbeat("ghost", WorkerLoad())
    now = a.last_seen_s
    b.last_seen_s = now - 5.0
    dead = reg.expire(now_s=now + 0.5)
    assert [w.worker_id for w in dead] == ["b"]
    assert [w.worker_id for w in reg.all()] == ["a"]


def test_round_robin_cycles() -> None:
    workers = [worker("a"), worker("b"), worker("c")]
    rr = RoundRobin()
    assert [rr.pick(workers, 10).worker_id for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_least_loaded_prefers_fewest_inflight_then_free_blocks() -> None:
    ll = LeastLoaded()
    workers = [
        worker("busy", inflight=3),
        worker("idle-full", inflight=0, free=1),
        worker("idle", inflight=0),
    ]
    assert ll.pick(workers, 10).worker_id == "idle"
    workers[2].num_inflight = 5
    assert ll.pick(workers, 10).worker_id == "idle-full"


def test_make_policy_names() -> None:
    assert isinstance(make_policy("round_robin"), RoundRobin)
    with pytest.raises(ValueError, match="round_robin"):
        make_policy("random")
