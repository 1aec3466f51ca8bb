"""shm and tcp transports between real processes.

The receiver lives in the test process; senders run in one spawned "sender
server" process (spawned once per module: importing torch costs seconds) and,
for the two-sender case, in the test process too. Both sides build the
sender's cache from a seed, so the test knows exactly what must arrive.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import subprocess
from typing import Any

import pytest
import torch
import zmq

from pdserve.transfer import KVDescriptor, KVLayout, TransferError, make_receiver, make_sender
from pdserve.transfer.multi import MultiSender
from pdserve.transfer.testing import (
    assert_request_arrived,
    assert_untouched_zero,
    collect,
    first_token_payload,
    plan_requests,
    random_cache,
    run_plan,
    send_plan,
    sender_server,
)

NUM_SRC_BLOCKS = 20


def layout_of(dtype: str) -> KVLayout:
    return KVLayout(num_layers=3, num_blocks=32, block_size=4, num_kv_heads=2, head_dim=8, dtype=dtype)


@pytest.fixture(scope="module")
def remote() -> Any:
    """A spawned process running senders on request (spawned once: importing torch takes seconds)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=sender_server, args=(child,), daemon=True)
    proc.start()
    yield parent
    parent.send(None)
    proc.join(timeout=10)
    if proc.is_alive():
        proc.kill()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_two_processes_interleaved_requests(remote: Any, transport: str, dtype: str) -> None:
    layout = layout_of(dtype)
    receiver = make_receiver(transport, layout)
    try:
        requests = plan_requests(NUM_SRC_BLOCKS, list(range(32)), num_requests=4, seed=5)
        remote.send((receiver.descriptor(), transport, 42, NUM_SRC_BLOCKS, requests, "d0"))
        done = collect(receiver, requests, random_cache(layout, NUM_SRC_BLOCKS, 42))
        status, stats = remote.recv()
        assert status == "ok", stats
        for r in requests:
            d = done[r["id"]]
            assert d.error is None
            assert d.payload == first_token_payload(r["id"])
            assert d.num_bytes == 2 * layout.num_layers * len(r["src"]) * layout.block_bytes
            assert d.transfer_s >= 0
        assert_untouched_zero(receiver, {b for r in requests for b in r["dst"]})
        assert stats.peers["d0"].transport == transport
        assert stats.peers["d0"].num_bytes == sum(d.num_bytes for d in done.values())
        assert stats.peers["d0"].num_requests == len(requests)
        assert receiver.stats().num_bytes == stats.peers["d0"].num_bytes
        assert receiver.stats().num_requests == len(requests)
        assert receiver.poll() == []
        if transport == "shm":  # the sender process attached and detached: the segment must survive it
            assert os.path.exists(f"/dev/shm/{receiver.descriptor().shm_name}")
    finally:
        name = receiver.descriptor().shm_name
        receiver.close()
    if name is not None:
        assert not os.path.exists(f"/dev/shm/{name}")  # unlinked by the receiver's close


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_receiver_from_two_sender_processes(remote: Any, transport: str) -> None:
    layout = layout_of("float32")
    receiver = make_receiver(transport, layout)
    try:
        remote_plan = plan_requests(NUM_SRC_BLOCKS, list(range(0, 32, 2)), 2, seed=8)
        local_plan = plan_requests(NUM_SRC_BLOCKS, list(range(1, 32, 2)), 2, seed=9)
        remote.send((receiver.descriptor(), transport, 1, NUM_SRC_BLOCKS, remote_plan, "d"))
        local_stats = send_plan(receiver.descriptor(), transport, 2, NUM_SRC_BLOCKS, local_plan, "d")
        done = collect(receiver, remote_plan + local_plan)
        assert remote.recv()[0] == "ok"
        remote_cache = random_cache(layout, NUM_SRC_BLOCKS, 1)
        local_cache = random_cache(layout, NUM_SRC_BLOCKS, 2)
        for cache, plan in ((remote_cache, remote_plan), (local_cache, local_plan)):
            for r in plan:
                assert done[r["id"]].error is None
                assert_request_arrived(receiver, cache, r)
        assert local_stats.peers["d"].num_requests == 2
        assert_untouched_zero(receiver, {b for p in (remote_plan, local_plan) for r in p for b in r["dst"]})
    finally:
        receiver.close()


def test_multi_sender_picks_transport_per_peer() -> None:
    layout = layout_of("float32")
    receivers = {"s": make_receiver("shm", layout), "t": make_receiver("tcp", layout),
                 "f": make_receiver("fake", layout)}
    cache = random_cache(layout, NUM_SRC_BLOCKS, 3)
    sender = make_sender(cache)
    assert isinstance(sender, MultiSender)
    try:
        for peer, receiver in receivers.items():
            sender.connect(peer, receiver.descriptor())
        assert {p: sender.transport_of(p) for p in receivers} == {"s": "shm", "t": "tcp", "f": "fake"}
        plan = plan_requests(NUM_SRC_BLOCKS, list(range(32)), 1, seed=4)
        for peer, receiver in receivers.items():
            run_plan(sender, peer, plan, layout.num_layers)
            (done,) = collect(receiver, plan, cache).values()
            assert done.error is None
        by_transport = sender.stats().by_transport()
        assert set(by_transport) == {"shm", "tcp", "fake"}
        assert len({s.num_bytes for s in by_transport.values()}) == 1
    finally:
        sender.close()
        for r in receivers.values():
            r.close()


def test_auto_receiver_is_shm_on_cpu() -> None:
    receiver = make_receiver("auto", layout_of("bfloat16"))
    try:
        desc = receiver.descriptor()
        assert desc.transport == "shm" and desc.shm_name is not None
        assert desc.endpoint.startswith("tcp://127.0.0.1:")  # loopback unless told otherwise
        assert receiver.kv_caches[0][0].dtype == torch.bfloat16
        assert not any(k.any() or v.any() for k, v in receiver.kv_caches)  # zeroed
    finally:
        receiver.close()


def test_shm_falls_back_to_tcp_and_override_errors() -> None:
    layout = layout_of("float32")
    receiver = make_receiver("shm", layout)
    try:
        desc = receiver.descriptor()
        broken = KVDescriptor(desc.transport, desc.endpoint, desc.host_id, desc.layout, "pdserve-kv-missing")
        cache = random_cache(layout, NUM_SRC_BLOCKS, 0)
        sender = make_sender(cache)
        sender.connect("d", broken)  # same host, but the segment cannot be attached: tcp instead
        assert isinstance(sender, MultiSender) and sender.transport_of("d") == "tcp"
        plan = plan_requests(NUM_SRC_BLOCKS, list(range(32)), 1, seed=1)
        run_plan(sender, "d", plan, layout.num_layers)
        (done,) = collect(receiver, plan, cache).values()  # shm receivers accept tcp senders
        assert done.error is None
        sender.close()
        forced = make_sender(cache, override="shm")
        with pytest.raises(TransferError, match="does not exist"):
            forced.connect("d", broken)
        forced.close()
    finally:
        receiver.close()


def test_tcp_discard_refuses_late_writes() -> None:
    layout = layout_of("float32")
    receiver = make_receiver("tcp", layout)
    sender = make_sender(random_cache(layout, NUM_SRC_BLOCKS, 0), override="tcp")
    try:
        sender.connect("d", receiver.descriptor())
        receiver.discard("r")
        for layer in range(layout.num_layers):
            sender.send_blocks("d", "r", layer, [0, 1], [5, 6])
        sender.send_done("d", "r", b"")
        sender.send_abort("d", "q", "prefill worker draining")
        (d,) = receiver.poll(timeout_s=5)  # the abort arrives after everything of r: r was dropped
        assert d.request_id == "q" and d.error == "prefill worker draining"
        assert_untouched_zero(receiver, set())
    finally:
        sender.close()
        receiver.close()


def test_tcp_receiver_survives_garbage_and_reports_bad_writes() -> None:
    from pdserve.transfer.wire import Blocks, encoder

    layout = layout_of("float32")
    receiver = make_receiver("tcp", layout)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(receiver.descriptor().endpoint)
    try:
        push.send(b"\xc1 not msgpack")  # dropped with a log line
        block = bytes(layout.block_bytes)
        push.send_multipart([encoder.encode(Blocks("bad", 0, [99])), block, block])  # id out of range
        (done,) = receiver.poll(timeout_s=5)
        assert done.request_id == "bad" and done.error is not None and "outside" in done.error
        sender = make_sender(random_cache(layout, NUM_SRC_BLOCKS, 0), override="tcp")  # still serving
        sender.connect("d", receiver.descriptor())
        plan = plan_requests(NUM_SRC_BLOCKS, list(range(32)), 1, seed=2)
        run_plan(sender, "d", plan, layout.num_layers)
        assert collect(receiver, plan)[plan[0]["id"]].error is None
        sender.close()
    finally:
        push.close(linger=0)
        ctx.term()
        receiver.close()


def test_unlink_stale_segments_removes_only_dead_creators() -> None:
    from pdserve.transfer.shm import SEGMENT_PREFIX, unlink_stale_segments

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{SEGMENT_PREFIX}{dead.pid}-abc123"
    alive = f"{SEGMENT_PREFIX}{os.getpid()}-abc123"
    for name in (stale, alive):
        with open(f"/dev/shm/{name}", "wb") as f:
            f.write(b"x")
    try:
        assert stale in unlink_stale_segments()
        assert not os.path.exists(f"/dev/shm/{stale}")
        assert os.path.exists(f"/dev/shm/{alive}")
    finally:
        for name in (stale, alive):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/dev/shm/{name}")
