"""shm and tcp transports between real processes.

The receiver lives in the test process; senders run in one spawned "sender
server" process (spawned once per module: importing torch costs seconds) and,
for the two-sender case, in the test process too. Both sides build the
sender's cache from a seed, so the test knows exactly what must arrive.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import secrets
import stat
import subprocess
import time
from typing import Any

import msgspec
import pytest
import torch
import zmq

from pdserve.transfer import KVLayout, KVReceiver, TransferError, make_receiver, make_sender
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
from pdserve.transfer.wire import Abort, Blocks, Done, encoder

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
        broken = msgspec.structs.replace(desc, shm_name="pdserve-kv-missing")
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
    layout = layout_of("float32")
    receiver = make_receiver("tcp", layout)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(receiver.descriptor().endpoint)
    try:
        push.send(b"\xc1 not msgpack")  # no token can be found in it: rejected
        block = bytes(layout.block_bytes)
        header = encoder.encode(Blocks(receiver.descriptor().token, "bad", 0, [99]))  # id out of range
        push.send_multipart([header, block, block])
        (done,) = receiver.poll(timeout_s=5)
        assert done.request_id == "bad" and done.error is not None and "outside" in done.error
        assert receiver.stats().num_rejected == 1  # the garbage, handled before "bad" (one connection)
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


# --------------------------------------------------------------------------- authentication


def wait_rejected(receiver: KVReceiver, num_rejected: int, timeout_s: float = 5.0) -> None:
    """Wait until the receiver has rejected exactly ``num_rejected`` messages (then it handled them all)."""
    deadline = time.monotonic() + timeout_s
    while receiver.stats().num_rejected < num_rejected:
        assert time.monotonic() < deadline, f"only {receiver.stats().num_rejected} of {num_rejected} rejected"
        time.sleep(0.01)
    assert receiver.stats().num_rejected == num_rejected


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_raw_socket_without_token_cannot_write_finish_or_abort(
    transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    layout = layout_of("float32")
    receiver = make_receiver(transport, layout)
    desc = receiver.descriptor()
    cache = random_cache(layout, NUM_SRC_BLOCKS, 7)
    sender = make_sender(cache, override=transport)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    try:
        sender.connect("d", desc)
        (r,) = plan_requests(NUM_SRC_BLOCKS, list(range(32)), 1, seed=3)
        for layer in range(layout.num_layers):  # the legitimate request is under way, its done not yet sent
            sender.send_blocks("d", r["id"], layer, r["src"], r["dst"])
        free = [b for b in range(32) if b not in r["dst"]][:2]
        ones = b"\x01" * (len(free) * layout.block_bytes)
        wrong = secrets.token_hex(16)
        caplog.set_level(logging.WARNING, logger="pdserve.transfer.tcp")
        push.connect(desc.endpoint)
        rogue = [
            [b"\xc1 not msgpack"],
            [msgspec.msgpack.encode(["b", r["id"], 0, free]), ones, ones],  # the header without a token
            [encoder.encode(Blocks(wrong, r["id"], 0, free)), ones, ones],
            [encoder.encode(Blocks("", r["id"], 1, free)), ones, ones],
            [encoder.encode(Done(wrong, r["id"], b"forged", 0, None, True))],
            [encoder.encode(Done(wrong[:-1], r["id"], b"forged", 0, None, False))],
            [encoder.encode(Abort(wrong, r["id"], "rogue abort"))],
            [encoder.encode(Abort("", r["id"], "rogue abort"))],
        ]
        for frames in rogue:
            push.send_multipart(frames)
        wait_rejected(receiver, len(rogue))
        assert receiver.poll() == []  # neither finished nor aborted
        assert_untouched_zero(receiver, set(r["dst"]))  # no rogue block written
        sender.send_done("d", r["id"], first_token_payload(r["id"]))  # the legitimate sender is unaffected
        done = collect(receiver, [r], cache)[r["id"]]
        assert done.error is None and done.payload == first_token_payload(r["id"])
        assert done.num_bytes == 2 * layout.num_layers * len(r["src"]) * layout.block_bytes
        stats = receiver.stats()
        assert (stats.num_requests, stats.num_failed, stats.num_rejected) == (1, 0, len(rogue))
        warnings = [rec for rec in caplog.records if "without this receiver's token" in rec.getMessage()]
        assert len(warnings) == 1 and "127.0.0.1" in warnings[0].getMessage()  # once for this peer
        assert desc.token not in caplog.text and wrong not in caplog.text and "rogue" not in caplog.text
    finally:
        push.close(linger=0)
        ctx.term()
        sender.close()
        receiver.close()


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_sender_with_altered_token_is_ignored(transport: str) -> None:
    layout = layout_of("float32")
    receiver = make_receiver(transport, layout)
    desc = receiver.descriptor()
    forged = msgspec.structs.replace(desc, token=secrets.token_hex(16))
    cache = random_cache(layout, NUM_SRC_BLOCKS, 11)
    plan = plan_requests(NUM_SRC_BLOCKS, list(range(32)), 2, seed=6)
    rogue = make_sender(random_cache(layout, NUM_SRC_BLOCKS, 12), override=transport)
    try:
        rogue.connect("d", forged)
        run_plan(rogue, "d", plan[:1], layout.num_layers)
        rogue.send_abort("d", plan[1]["id"], "forged abort")
        # shm writes blocks straight into the segment (a same-user process can map it; see shm.py):
        # only the done and abort notices travel on the link. tcp sends blocks there too.
        num_block_msgs = 0 if transport == "shm" else rogue.stats().peers["d"].num_block_sends
        wait_rejected(receiver, num_block_msgs + 2)
        assert receiver.poll() == []
        if transport == "tcp":
            assert_untouched_zero(receiver, set())
        rogue.close()
        legit = make_sender(cache, override=transport)
        legit.connect("d", desc)
        run_plan(legit, "d", plan, layout.num_layers)  # the same request ids: no rogue state left over
        legit.close()
        done = collect(receiver, plan, cache)
        for r in plan:
            assert done[r["id"]].error is None
            assert done[r["id"]].num_bytes == 2 * layout.num_layers * len(r["src"]) * layout.block_bytes
        assert (receiver.stats().num_requests, receiver.stats().num_rejected) == (2, num_block_msgs + 2)
    finally:
        rogue.close()
        receiver.close()


def test_receivers_draw_distinct_tokens() -> None:
    receivers = [make_receiver(t, layout_of("float32")) for t in ("shm", "shm", "tcp")]
    try:
        tokens = [r.descriptor().token for r in receivers]
        assert len(set(tokens)) == 3 and all(len(t) == 32 and int(t, 16) >= 0 for t in tokens)
        assert make_receiver("fake", layout_of("float32")).descriptor().token == ""  # in-process only
    finally:
        for r in receivers:
            r.close()


@pytest.mark.parametrize("umask", [0o000, 0o277])
def test_shm_segment_is_private_to_its_user_whatever_the_umask(umask: int) -> None:
    old = os.umask(umask)
    try:
        receiver = make_receiver("shm", layout_of("float32"))
    finally:
        os.umask(old)
    try:
        name = receiver.descriptor().shm_name
        assert name is not None and name.startswith(f"pdserve-kv-{os.getpid()}-")
        assert stat.S_IMODE(os.stat(f"/dev/shm/{name}").st_mode) == 0o600
        assert os.stat(f"/dev/shm/{name}").st_uid == os.getuid()
    finally:
        receiver.close()
    assert not os.path.exists(f"/dev/shm/{name}")


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
