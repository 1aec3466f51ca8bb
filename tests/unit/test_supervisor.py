"""The supervisor's decisions (restarts, backoff, crash loops, scaling, flips), fake backend and router."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from pdserve.launch.base import Placement, WorkerSpec
from pdserve.launch.supervisor import RouterGone, Supervisor, SupervisorConfig


class FakeProcess:
    """A process that runs until the test ends it."""

    def __init__(self, name: str, pid: int) -> None:
        self.name = name
        self.pid = pid
        self.code: int | None = None
        self.terminated = False

    def poll(self) -> int | None:
        return self.code

    def terminate(self) -> None:
        self.terminated = True

    def kill(self) -> None:
        self.code = -9

    def placement(self) -> Placement:
        return Placement(host="here", pid=self.pid)


class FakeRouter(FakeProcess):
    def __init__(self, pid: int, port: int) -> None:
        super().__init__("router", pid)
        self.url = f"http://127.0.0.1:{port}"
        self.control_endpoint = "tcp://127.0.0.1:5999"


class FakeBackend:
    def __init__(self) -> None:
        self.workers: list[tuple[WorkerSpec, FakeProcess]] = []
        self.routers: list[tuple[list[str], FakeRouter]] = []
        self.next_pid = 100
        self.fail_router = False

    def start_router(self, args: list[str], env: dict[str, str]) -> FakeRouter:
        if self.fail_router:
            raise RuntimeError("router exited with code 1 during start-up")
        self.next_pid += 1
        port = int(args[args.index("--port") + 1]) or 8123
        router = FakeRouter(self.next_pid, port)
        self.routers.append((args, router))
        return router

    def start_worker(self, spec: WorkerSpec) -> FakeProcess:
        self.next_pid += 1
        proc = FakeProcess(spec.worker_id, self.next_pid)
        self.workers.append((spec, proc))
        return proc

    def close(self) -> None:
        pass

    def live(self, worker_id: str) -> FakeProcess:
        return next(p for s, p in reversed(self.workers) if s.worker_id == worker_id)


class FakeRouterLink:
    """The router's side of the sync: targets, registered workers, applied drains and flips."""

    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend
        self.targets: dict[str, int] | None = None
        self.generation = 0
        self.registered: dict[str, dict[str, Any]] = {}
        self.drained: list[str] = []
        self.flipped: dict[str, str] = {}
        self.terminated_when_drained: list[bool] = []

    def register_all(self) -> None:
        """Every running worker registers under its spec's (or flipped) role."""
        for spec, proc in self.backend.workers:
            if proc.code is None and not proc.terminated:
                role = self.flipped.get(spec.worker_id, spec.role)
                self.registered[spec.worker_id] = {"worker_id": spec.worker_id, "role": role, "pid": proc.pid,
                                                   "num_inflight": 0, "draining": False}

    def __call__(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.targets is None:
            self.targets = dict(body["targets"])
            self.generation += 1
        for wid in body["drain"]:
            self.drained.append(wid)
            self.terminated_when_drained.append(self.backend.live(wid).terminated)
        self.flipped.update(body["flip"])
        for wid in body["flip"]:
            self.registered.pop(wid, None)
        for wid in list(self.registered):
            if self.backend.live(wid).code is not None:
                del self.registered[wid]
        workers = list(self.registered.values())
        return {"targets": self.targets, "generation": self.generation, "workers": workers}

    def scale(self, **targets: int) -> None:
        assert self.targets is not None
        self.targets = {**self.targets, **targets}
        self.generation += 1


def make(targets: dict[str, int], **config: Any) -> tuple[Supervisor, FakeBackend, FakeRouterLink]:
    backend = FakeBackend()
    link = FakeRouterLink(backend)

    def spec(worker_id: str, role: str, router: str) -> WorkerSpec:
        return WorkerSpec(worker_id, role, ["--role", role, "--router", router, "--worker-id", worker_id])

    sup = Supervisor(SupervisorConfig(targets=targets, port=0, **config), backend, spec, link)
    return sup, backend, link


def started(targets: dict[str, int], **config: Any) -> tuple[Supervisor, FakeBackend, FakeRouterLink]:
    """A supervisor whose initial workers all registered."""
    sup, backend, link = make(targets, **config)
    launch_all(sup, backend, link)
    assert all(s.state == "ready" for s in sup.slots)
    return sup, backend, link


def launch_all(sup: Supervisor, backend: FakeBackend, link: FakeRouterLink) -> None:
    """Start the router and a slot per initial worker; every worker registers; one pass."""
    sup.router = backend.start_router(["--port", "0"], {})
    for role, n in sup.targets.items():
        for _ in range(n):
            sup._add_slot(role)
    link.register_all()
    sup.step(now=0.0)


def states(sup: Supervisor) -> dict[str, str]:
    return {s.worker_id: s.state for s in sup.slots}


def test_an_exited_worker_is_restarted_with_the_same_spec_after_a_doubling_backoff() -> None:
    sup, backend, link = started({"prefill": 1, "decode": 2})
    first_spec = next(s for s, _ in backend.workers if s.worker_id == "decode-1")
    backend.live("decode-1").code = -9
    sup.step(now=10.0)
    assert states(sup)["decode-1"] == "restarting"
    sup.step(now=10.4)
    assert len(backend.workers) == 3  # not yet: the first backoff is 0.5 s
    sup.step(now=10.6)
    spec, proc = backend.workers[-1]
    assert spec == first_spec and proc.code is None and states(sup)["decode-1"] == "starting"
    link.register_all()
    sup.step(now=11.0)
    assert states(sup)["decode-1"] == "ready"
    proc.code = 1  # again, soon: the backoff doubles
    sup.step(now=12.0)
    sup.step(now=12.9)
    assert len(backend.workers) == 4
    sup.step(now=13.1)
    assert len(backend.workers) == 5 and sup.slots[2].restarts == 2


def test_a_crash_loop_stops_restarting_that_slot_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    sup, backend, link = started({"prefill": 1, "decode": 2}, backoff_max_s=1.0)
    now = 0.0
    with caplog.at_level(logging.ERROR, logger="pdserve.launch.supervisor"):
        for _ in range(5):
            now += 2.0
            sup.step(now=now)  # restarts it once its backoff is over
            link.register_all()
            sup.step(now=now + 0.1)  # sees it registered: it did start
            backend.live("decode-0").code = -11
            now += 2.0
            sup.step(now=now)
        for _ in range(5):
            now += 5.0
            sup.step(now=now)
    slot = next(s for s in sup.slots if s.worker_id == "decode-0")
    assert slot.state == "failed" and "crash loop: 5 exits" in slot.message
    assert len([s for s, _ in backend.workers if s.worker_id == "decode-0"]) == 5  # no sixth start
    assert len([r for r in caplog.records if "decode-0" in r.getMessage()]) == 1
    assert states(sup)["decode-1"] == "ready" and states(sup)["prefill-0"] == "ready"
    # The failed slot still holds its place: nothing replaces it behind the operator's back.
    assert len(sup.slots) == 3


def test_a_worker_that_never_registers_is_reported_as_unable_to_start() -> None:
    sup, backend, _link = make({"mixed": 1}, max_start_failures=3)
    sup.router = backend.start_router(["--port", "0"], {})
    sup._add_slot("mixed")
    now = 0.0
    for _ in range(10):
        backend.live("mixed-0").code = 1  # e.g. a bad model path
        now += 40.0  # slow failures: never 5 within the crash-loop window
        sup.step(now=now)
        sup.step(now=now + 35.0)
    slot = sup.slots[0]
    assert slot.state == "failed"
    assert slot.message.startswith("cannot start: exited 3 times before registering")
    assert len(backend.workers) == 3


def test_scale_down_drains_the_least_loaded_before_stopping_it() -> None:
    sup, backend, link = started({"prefill": 1, "decode": 3})
    link.registered["decode-0"]["num_inflight"] = 3
    link.registered["decode-1"]["num_inflight"] = 1
    link.registered["decode-2"]["num_inflight"] = 2
    link.scale(decode=2)
    sup.step(now=1.0)  # sees the new target, decides
    sup.step(now=1.25)  # tells the router, then terminates
    assert link.drained == ["decode-1"] and link.terminated_when_drained == [False]
    assert backend.live("decode-1").terminated and states(sup)["decode-1"] == "draining"
    backend.live("decode-1").code = 0
    sup.step(now=2.0)
    assert sorted(states(sup)) == ["decode-0", "decode-2", "prefill-0"]
    sup.step(now=3.0)
    assert len(backend.workers) == 4  # nothing restarted


def test_one_pool_shrinking_while_another_grows_flips_a_worker() -> None:
    sup, backend, link = started({"prefill": 1, "decode": 2})
    link.scale(prefill=2, decode=1)
    sup.step(now=1.0)
    sup.step(now=1.25)
    assert list(link.flipped.values()) == ["prefill"] and link.drained == []
    (wid,) = link.flipped
    assert states(sup)[wid] == "flipping"
    link.register_all()
    sup.step(now=2.0)
    slot = next(s for s in sup.slots if s.worker_id == wid)
    assert slot.state == "ready" and slot.role == "prefill"
    assert len(backend.workers) == 3  # no new process
    # A restart of the flipped slot comes back in its new role.
    backend.live(wid).code = -9
    sup.step(now=3.0)
    sup.step(now=4.0)
    assert backend.workers[-1][0].role == "prefill" and backend.workers[-1][0].worker_id == wid


def test_scale_up_starts_new_slots_and_a_new_target_retries_failed_ones() -> None:
    sup, backend, link = started({"mixed": 1}, max_start_failures=1)
    link.scale(mixed=2)
    sup.step(now=1.0)
    assert states(sup) == {"mixed-0": "ready", "mixed-1": "starting"}
    backend.live("mixed-1").code = 1
    sup.step(now=2.0)
    assert states(sup)["mixed-1"] == "failed"
    sup.step(now=100.0)
    assert len(backend.workers) == 2
    link.scale(mixed=3)
    sup.step(now=101.0)
    assert sorted(states(sup).values()) == ["ready", "starting", "starting"]


def test_the_router_is_restarted_on_its_ports_and_a_router_crash_loop_ends_the_deployment() -> None:
    sup, backend, _link = started({"mixed": 1})
    assert sup.router is not None
    sup.router.code = -9
    sup.step(now=1.0)
    args, router = backend.routers[-1]
    assert len(backend.routers) == 2 and args[args.index("--port") + 1] == "8123"
    assert args[args.index("--control-port") + 1] == "5999"
    backend.fail_router = True
    router.code = 1
    with pytest.raises(RouterGone):
        sup.step(now=2.0)


def test_bad_targets_are_refused() -> None:
    with pytest.raises(ValueError):
        make({"prefill": -1})
    with pytest.raises(ValueError):
        make({"gpu": 1})


def test_the_local_backend_knows_the_shm_segment_names() -> None:
    from pdserve.launch import local_backend
    from pdserve.transfer import shm

    assert local_backend.SEGMENT_PREFIX == shm.SEGMENT_PREFIX


def test_a_stop_waits_for_a_flip_of_the_same_pass() -> None:
    """1P+1D → 1M: the prefill worker flips to mixed and the decode worker is drained only once the
    flip is done (found by the simulated planner: both at once left no worker to serve, so 503s)."""
    sup, _, link = started({"prefill": 1, "decode": 1})
    link.scale(prefill=0, decode=0, mixed=1)
    sup.step(now=1.0)
    sup.step(now=1.25)
    assert link.flipped == {"prefill-0": "mixed"} and link.drained == []
    assert states(sup) == {"prefill-0": "flipping", "decode-0": "ready"}
    link.register_all()
    sup.step(now=2.0)  # the flip is done: now the decode worker goes
    sup.step(now=2.25)
    assert link.drained == ["decode-0"] and states(sup)["prefill-0"] == "ready"


def test_once_stopping_no_worker_or_router_is_restarted() -> None:
    """Ctrl-C reaches the workers too: their exits during the stop must not be taken for crashes."""
    sup, backend, _link = started({"prefill": 1, "decode": 1})
    backend.live("decode-0").code = 0
    sup.step(now=1.0)
    assert states(sup)["decode-0"] == "restarting"  # its backoff runs out at 1.5 s
    sup.request_stop()
    assert sup.router is not None
    sup.router.code = -2
    backend.live("prefill-0").code = -2
    sup.step(now=100.0)
    assert len(backend.workers) == 2 and len(backend.routers) == 1


def test_a_signal_during_a_pass_lets_it_start_nothing() -> None:
    """The sync answered a bigger target, but the stop came while the pass ran: nothing is started."""
    sup, backend, link = started({"prefill": 1, "decode": 1})
    link.scale(decode=3)

    def sync_then_signal(url: str, body: dict[str, Any]) -> dict[str, Any]:
        sup.request_stop()  # as the signal handler does, while the supervisor waits for the router
        return link(url, body)

    sup._link = sync_then_signal
    sup.step(now=1.0)
    assert len(backend.workers) == 2


def test_close_stops_the_supervision() -> None:
    sup, backend, _link = started({"mixed": 1})
    sup.close()
    backend.live("mixed-0").code = 1
    sup.step(now=10.0)
    assert sup.stopping and len(backend.workers) == 1
