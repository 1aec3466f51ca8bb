"""Which messages each role accepts: a worker's handling of requests it cannot serve is an error reply,
never a crash, and a mixed worker accepts both sides of a hand-off and requests of its own.

The workers are real (engine, KV side, control socket); the test plays the router on a ROUTER socket.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from pdserve.config import Role
from pdserve.engine.llm import make_engine_config
from pdserve.worker import protocol as p
from pdserve.worker.config import WorkerConfig
from pdserve.worker.worker import Worker

OPTIONS = {"block_size": 16, "chunk_size": 16, "kv_cache_bytes": 4 << 20}
PARAMS = p.WireSamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture
def router() -> Iterator[Any]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind("tcp://127.0.0.1:*")
    yield sock
    sock.close(0)
    ctx.term()


def worker(router: Any, role: Role, name: str) -> Worker:
    endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
    engine = make_engine_config("tiny", role=role.value, **OPTIONS)
    return Worker(WorkerConfig(engine, router=endpoint, worker_id=name, kv_transport="shm"))


def replies(router: Any, timeout_s: float = 10.0) -> list[p.Message]:
    """Messages the workers sent, until none comes for a moment."""
    out: list[p.Message] = []
    deadline = time.monotonic() + timeout_s
    while router.poll(200) and time.monotonic() < deadline:
        _, data = router.recv_multipart()
        out.append(p.decode(data))
    return out


def test_roles_refuse_what_they_cannot_serve_with_a_clear_error(router: Any) -> None:
    prefill, decode = worker(router, Role.PREFILL, "p"), worker(router, Role.DECODE, "d")
    assert decode.receiver is not None
    try:
        prefill._handle(p.DecodeRequest("r1", [1, 2, 3], PARAMS, "m"))
        decode._handle(p.PrefillRequest("r2", [1, 2, 3], PARAMS, "d2", decode.receiver.descriptor()))
        prefill._handle(p.PrefillRequest("r3", [1, 2, 3], PARAMS))
        failed = {m.request_id: m for m in replies(router) if isinstance(m, p.RequestFailed)}
        assert failed["r1"].code == 400 and "cannot take KV" in failed["r1"].message
        assert failed["r2"].code == 400 and "cannot hand KV" in failed["r2"].message
        assert failed["r3"].code == 400 and "needs a decode worker" in failed["r3"].message
        for w in (prefill, decode):
            assert not w.engine.has_unfinished_requests()
    finally:
        prefill.close()
        decode.close()


def test_a_mixed_worker_takes_both_sides_and_its_own_requests(router: Any) -> None:
    mixed, decode = worker(router, Role.MIXED, "m"), worker(router, Role.DECODE, "d")
    assert mixed.receiver is not None and mixed.pusher is not None and decode.receiver is not None
    try:
        mixed.register()
        [registered] = [m for m in replies(router) if isinstance(m, p.Register)]
        assert registered.role == "mixed" and registered.kv == mixed.receiver.descriptor()
        assert registered.kv.layout.num_blocks == mixed.engine.runner.num_blocks  # the cache it computes in
        mixed._handle(p.DecodeRequest("in", list(range(10, 50)), PARAMS, "p"))  # P→M: reserve
        mixed._handle(p.PrefillRequest("out", list(range(10, 40)), PARAMS, "d", decode.receiver.descriptor()))
        mixed._handle(p.PrefillRequest("own", list(range(10, 30)), PARAMS))
        got = replies(router)
        [reserved] = [m for m in got if isinstance(m, p.Reserved)]
        assert reserved.request_id == "in" and len(reserved.block_ids) == 3  # 40 tokens + 1, 16 per block
        assert not [m for m in got if isinstance(m, p.RequestFailed)]
        assert mixed.pusher.is_tracked("out") and not mixed.pusher.is_tracked("own")
        sched = mixed.engine.scheduler
        assert set(sched.waiting_for_kv) == {"in"} and {r.request_id for r in sched.waiting} == {"own"}
        assert set(sched.gated) == {"out"}  # the prefill gate: nothing computed before D reserved blocks
        mixed._handle(p.Blocks("out", [0, 1], 0))
        assert not sched.gated and {r.request_id for r in sched.waiting} == {"own", "out"}
        for rid in ("in", "out", "own"):
            mixed._handle(p.Abort(rid))
        assert not mixed.pusher.is_tracked("out")
        assert {r.request_id for r in sched.waiting} == set()
        assert set(sched.waiting_for_kv) == {"in"}  # quarantined: the prefill side may still write
    finally:
        mixed.close()
        decode.close()


def test_set_threads_changes_torch_threads_and_the_heartbeat_reports_them(router: Any) -> None:
    import torch

    before = torch.get_num_threads()
    w = worker(router, Role.MIXED, "t")
    try:
        torch.set_num_threads(1)
        w.register()
        [registered] = [m for m in replies(router) if isinstance(m, p.Register)]
        assert registered.threads == 1 and w.load().threads == 1
        router.send_multipart([b"t", p.encode(p.SetThreads(2))])  # as the router sends it
        deadline = time.monotonic() + 10
        while torch.get_num_threads() != 2 and time.monotonic() < deadline:
            w._drain_messages()  # what the worker's loop does between steps
            time.sleep(0.01)
        assert torch.get_num_threads() == 2 and w.load().threads == 2  # what every heartbeat carries
        w._handle(p.SetThreads(0))  # a bad count is ignored
        assert torch.get_num_threads() == 2
        w._handle(p.Flip("prefill"))
        w._finish_flip(Role.PREFILL)  # nothing to drain: a flip keeps the thread count
        [again] = [m for m in replies(router) if isinstance(m, p.Register)]
        assert again.role == "prefill" and again.threads == 2 and torch.get_num_threads() == 2
    finally:
        w.close()
        torch.set_num_threads(before)
