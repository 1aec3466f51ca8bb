"""The supervisor's threads target (launch/threads.py): new workers start with it, ready ones are told
``SetThreads`` (lowerings at once, raises once nothing drains or starts), and a worker counts as changed
only once the router reports its new count. Fake backend and router as in test_supervisor.py."""

from __future__ import annotations

from typing import Any

from test_supervisor import FakeBackend, FakeRouterLink, launch_all, states

from pdserve.launch.base import WorkerSpec
from pdserve.launch.supervisor import Supervisor, SupervisorConfig
from pdserve.launch.threads import RESEND_S


class ThreadsLink(FakeRouterLink):
    """The fake router, with a threads target, the ``set_threads`` it was sent, and each worker's
    reported count (what it started with until :meth:`apply` delivers what was sent)."""

    def __init__(self, backend: FakeBackend) -> None:
        super().__init__(backend)
        self.threads: int | None = None
        self.sent: list[dict[str, int]] = []  # every sync's set_threads that was not empty
        self.undelivered: dict[str, int] = {}

    def register_all(self) -> None:
        known = {wid: entry["threads"] for wid, entry in self.registered.items()}
        super().register_all()
        for wid, entry in self.registered.items():
            spec = next(s for s, _ in reversed(self.backend.workers) if s.worker_id == wid)
            entry["threads"] = known.get(wid, spec.threads)

    def __call__(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        reply = super().__call__(url, body)
        if self.threads is None and "threads" in body:
            self.threads = body["threads"]
        if body.get("set_threads"):
            self.sent.append(dict(body["set_threads"]))
            self.undelivered.update(body["set_threads"])
        return {**reply, "threads": self.threads}

    def apply(self, *worker_ids: str) -> None:
        """These workers (all by default) applied what they were sent; their heartbeats report it."""
        for wid in worker_ids or list(self.undelivered):
            self.registered[wid]["threads"] = self.undelivered.pop(wid)

    def scale_threads(self, threads: int, **targets: int) -> None:
        self.threads = threads
        self.scale(**targets)


def started(targets: dict[str, int], threads: int) -> tuple[Supervisor, FakeBackend, ThreadsLink]:
    """A supervisor whose workers (``threads`` each, as ``pdserve serve`` starts them) all registered."""
    backend = FakeBackend()
    link = ThreadsLink(backend)

    def spec(worker_id: str, role: str, router: str) -> WorkerSpec:
        args = ["--role", role, "--worker-id", worker_id, "--threads", str(threads)]
        return WorkerSpec(worker_id, role, args, threads=threads)

    sup = Supervisor(SupervisorConfig(targets=targets, port=0), backend, spec, link)
    launch_all(sup, backend, link)
    assert all(s.state == "ready" and s.threads == threads for s in sup.slots)
    return sup, backend, link


def threads(sup: Supervisor) -> dict[str, int]:
    return {s.worker_id: s.threads for s in sup.slots}


def test_no_target_changes_nothing() -> None:
    sup, backend, link = started({"mixed": 2}, threads=3)
    link.scale(mixed=3)
    for now in (1.0, 2.0, 10.0):
        sup.step(now=now)
    spec = backend.workers[-1][0]
    assert spec.threads == 3 and spec.args[-2:] == ["--threads", "3"]  # as the factory built it
    assert link.sent == [] and sup.threads_target is None


def test_new_and_restarted_workers_start_with_the_target() -> None:
    sup, backend, link = started({"mixed": 1}, threads=1)
    link.scale_threads(2, mixed=2)
    sup.step(now=1.0)
    spec = backend.workers[-1][0]
    assert spec.worker_id == "mixed-1" and spec.threads == 2
    assert spec.args[-2:] == ["--threads", "2"]  # after the factory's: the worker takes the last one
    assert sup.threads_target == 2 and threads(sup)["mixed-1"] == 2
    assert sup.slots[1].view()["threads"] == 2
    backend.live("mixed-1").code = -9
    sup.step(now=2.0)
    sup.step(now=3.0)  # its backoff is over: restarted
    assert backend.workers[-1][0].worker_id == "mixed-1" and backend.workers[-1][0].threads == 2


def test_a_lowering_is_sent_at_once_and_counts_only_once_reported() -> None:
    sup, _, link = started({"mixed": 2}, threads=4)
    link.scale_threads(2)
    sup.step(now=1.0)  # sees the target, decides
    sup.step(now=1.25)  # tells the router
    assert link.sent == [{"mixed-0": 2, "mixed-1": 2}]
    assert threads(sup) == {"mixed-0": 4, "mixed-1": 4}  # told, not changed yet
    assert [s.view()["threads_to"] for s in sup.slots] == [2, 2]
    link.apply("mixed-0")
    sup.step(now=1.5)
    assert threads(sup) == {"mixed-0": 2, "mixed-1": 4}
    assert [s.threads_to for s in sup.slots] == [None, 2]
    sup.step(now=1.25 + RESEND_S / 2)
    assert len(link.sent) == 1  # not reported yet, but not long enough to tell it again
    sup.step(now=1.0 + RESEND_S + 0.1)  # decides to tell it again
    sup.step(now=1.25 + RESEND_S + 0.1)
    assert link.sent[1:] == [{"mixed-1": 2}]
    link.apply()
    sup.step(now=10.0)
    assert threads(sup) == {"mixed-0": 2, "mixed-1": 2} and all(s.threads_to is None for s in sup.slots)
    sup.step(now=20.0)
    assert len(link.sent) == 2  # at the target: nothing more


def test_two_workers_at_one_thread_become_one_at_two_stopping_one_first() -> None:
    """The cores must be free before another worker takes them: drain and stop, then raise."""
    sup, backend, link = started({"mixed": 2}, threads=1)
    link.scale_threads(2, mixed=1)
    sup.step(now=1.0)
    sup.step(now=1.25)
    assert len(link.drained) == 1
    (gone,) = link.drained
    (kept,) = {"mixed-0", "mixed-1"} - {gone}
    assert states(sup)[gone] == "draining"
    for now in (2.0, 3.0, 10.0):  # it drains for a while: the other worker keeps its one thread
        sup.step(now=now)
    assert link.sent == [] and threads(sup)[kept] == 1
    backend.live(gone).code = 0
    sup.step(now=11.0)  # it stopped: now the raise is decided
    sup.step(now=11.25)
    assert states(sup) == {kept: "ready"} and link.sent == [{kept: 2}]
    assert threads(sup) == {kept: 1}
    link.apply()
    sup.step(now=11.5)
    assert threads(sup) == {kept: 2}


def test_a_raise_waits_for_a_starting_worker_and_for_lowerings_to_be_reported() -> None:
    sup, backend, link = started({"mixed": 1}, threads=4)
    link.scale_threads(2, mixed=2)  # 1 × 4 -> 2 × 2: the new worker starts with 2, the old one lowers
    sup.step(now=1.0)
    sup.step(now=1.25)
    assert link.sent == [{"mixed-0": 2}] and backend.workers[-1][0].threads == 2
    link.apply()
    link.register_all()
    sup.step(now=1.5)
    assert threads(sup) == {"mixed-0": 2, "mixed-1": 2} and states(sup)["mixed-1"] == "ready"
    # A worker that came up with fewer threads than the target (say its backend chose them) is raised
    # only while no other is starting and no lowering is left unreported.
    link.registered["mixed-1"]["threads"] = 1
    link.scale_threads(2, mixed=3)
    sup.step(now=2.0)  # mixed-2 starts
    sup.step(now=2.25)
    assert link.sent == [{"mixed-0": 2}] and states(sup)["mixed-2"] == "starting"
    link.register_all()
    sup.step(now=3.0)  # mixed-2 registered: nothing starts any more
    sup.step(now=3.25)
    assert link.sent[1:] == [{"mixed-1": 2}]


def test_a_raise_waits_until_the_lowerings_are_reported() -> None:
    sup, _, link = started({"mixed": 2}, threads=2)
    link.registered["mixed-0"]["threads"] = 4  # as their backend started them (Ray: the CPUs reserved)
    link.registered["mixed-1"]["threads"] = 1
    link.scale_threads(2)
    sup.step(now=1.0)
    sup.step(now=1.25)
    assert link.sent == [{"mixed-0": 2}]  # the lowering only
    sup.step(now=1.5)
    sup.step(now=1.75)
    assert link.sent == [{"mixed-0": 2}] and threads(sup) == {"mixed-0": 4, "mixed-1": 1}
    link.apply()
    sup.step(now=2.0)  # mixed-0 reports 2: its cores are free, mixed-1 may take one
    sup.step(now=2.25)
    assert link.sent[1:] == [{"mixed-1": 2}]
