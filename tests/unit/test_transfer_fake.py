"""The transfer contract on the in-process ``fake`` transport, plus the transport-independent helpers."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest
import torch

from pdserve.transfer import (
    KVDescriptor,
    KVLayout,
    TransferError,
    choose_transport,
    host_id,
    make_receiver,
    make_sender,
)
from pdserve.transfer.blocks import (
    block_runs,
    copy_blocks,
    copy_blocks_torch,
    gather_blocks,
    gather_blocks_torch,
    scatter_blocks,
    scatter_blocks_torch,
)
from pdserve.transfer.fake import FakeReceiver, FakeSender
from pdserve.transfer.multi import MultiSender
from pdserve.transfer.testing import (
    assert_request_arrived,
    assert_untouched_zero,
    first_token_payload,
    plan_requests,
    random_cache,
    run_plan,
)

LAYOUT = KVLayout(num_layers=3, num_blocks=24, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")


# --------------------------------------------------------------------------- helpers


def test_layout_sizes_and_validation() -> None:
    assert LAYOUT.block_bytes == 4 * 2 * 8 * 4
    assert LAYOUT.tensor_bytes == 24 * LAYOUT.block_bytes
    cache = random_cache(LAYOUT, 24, 0)
    assert KVLayout.of(cache) == LAYOUT
    with pytest.raises(TransferError, match="dtype"):
        KVLayout(1, 1, 1, 1, 1, "int8")
    with pytest.raises(TransferError, match="num_blocks"):
        KVLayout(1, 0, 1, 1, 1, "float32")
    with pytest.raises(TransferError, match="layer 1"):
        KVLayout.of([cache[0], (cache[1][0][:3], cache[1][1])])


def test_block_runs_coalesce_consecutive_pairs() -> None:
    assert block_runs([], []) == []
    assert block_runs([3, 4, 5], [7, 8, 9]) == [(3, 7, 3)]
    assert block_runs([3, 4, 9, 10, 2], [0, 1, 2, 3, 4]) == [(3, 0, 2), (9, 2, 2), (2, 4, 1)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_copy_gather_scatter_blocks(dtype: str) -> None:
    layout = KVLayout(1, 10, 4, 2, 8, dtype)
    (src, _), = random_cache(layout, 10, 1)
    dst = torch.zeros_like(src)
    copy_blocks(src, [5, 6, 1, 9], dst, [0, 1, 7, 3])
    assert torch.equal(dst[[0, 1, 7, 3]], src[[5, 6, 1, 9]])
    assert not dst[[2, 4, 5, 6, 8, 9]].any()
    for ids in ([2, 3, 4], [8, 1, 2]):  # one run (a view) and several runs (gathered)
        data = gather_blocks(src, None, ids)
        out = torch.zeros_like(src)
        scatter_blocks(data, out, None, [9, 0, 5])
        assert torch.equal(out[[9, 0, 5]], src[ids])
    # the torch-only paths taken when a side is on CUDA, exercised on CPU tensors
    for src_ids, dst_ids in (([1, 2], [3, 4]), ([9, 7, 5, 3, 1, 0], [0, 2, 4, 6, 8, 9])):  # ≤4, >4 runs
        out = torch.zeros_like(src)
        copy_blocks_torch(src, src_ids, out, dst_ids)
        assert torch.equal(out[dst_ids], src[src_ids])
        out = torch.zeros_like(src)
        scatter_blocks_torch(gather_blocks_torch(src, src_ids), out, dst_ids)
        assert torch.equal(out[dst_ids], src[src_ids])


def test_choose_transport() -> None:
    here = host_id()
    shm = KVDescriptor("shm", "tcp://127.0.0.1:1", here, LAYOUT, shm_name="seg")
    tcp = KVDescriptor("tcp", "tcp://127.0.0.1:2", here, LAYOUT)
    fake = KVDescriptor("fake", "fake-x", here, LAYOUT)
    assert choose_transport(here, shm, None) == "shm"
    assert choose_transport("elsewhere", shm, None) == "tcp"
    assert choose_transport(here, tcp, None) == "tcp"
    assert choose_transport(here, shm, "tcp") == "tcp"
    assert choose_transport(here, fake, None) == "fake"
    with pytest.raises(TransferError, match="shared memory"):
        choose_transport(here, tcp, "shm")
    with pytest.raises(TransferError, match="host"):
        choose_transport("elsewhere", shm, "shm")
    with pytest.raises(TransferError, match="fake"):
        choose_transport(here, fake, "tcp")
    with pytest.raises(TransferError, match="fake"):
        choose_transport(here, tcp, "fake")
    with pytest.raises(TransferError, match="one of"):
        choose_transport(here, tcp, "rdma")
    assert host_id() == here  # stable


# --------------------------------------------------------------------------- fake transport


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fake_interleaved_requests_arrive_exactly(dtype: str) -> None:
    layout = KVLayout(3, 24, 4, 2, 8, dtype)
    receiver = make_receiver("fake", layout)
    src_cache = random_cache(layout, 16, seed=7)
    sender = make_sender(src_cache)
    sender.connect("d0", receiver.descriptor())
    sender.connect("d0", receiver.descriptor())  # idempotent
    requests = plan_requests(16, list(range(24)), num_requests=3, seed=3)

    reported: list = []

    def check_no_early_done() -> None:  # a done may only show up once its request's data is complete
        for done in receiver.poll():
            reported.append(done)
            request = next(r for r in requests if r["id"] == done.request_id)
            assert_request_arrived(receiver, src_cache, request)

    run_plan(sender, "d0", requests, layout.num_layers, on_step=check_no_early_done)
    check_no_early_done()
    assert sorted(d.request_id for d in reported) == sorted(r["id"] for r in requests)
    for r in requests:
        assert_request_arrived(receiver, src_cache, r)
        done = next(d for d in reported if d.request_id == r["id"])
        assert done.error is None
        assert done.payload == first_token_payload(r["id"])
        assert done.num_bytes == 2 * layout.num_layers * len(r["src"]) * layout.block_bytes
        assert done.transfer_s >= 0
    assert_untouched_zero(receiver, {b for r in requests for b in r["dst"]})

    stats = sender.stats()
    expected_bytes = sum(d.num_bytes for d in reported)
    assert stats.peers["d0"].num_bytes == expected_bytes == stats.num_bytes
    assert stats.peers["d0"].num_requests == 3
    assert stats.peers["d0"].num_block_sends == layout.num_layers * sum(len(r["chunks"]) for r in requests)
    assert stats.by_transport()["fake"].num_bytes == expected_bytes
    assert stats.num_transfers == 3 and stats.transports == {"fake"}
    received = receiver.stats()
    assert (received.num_requests, received.num_failed, received.num_bytes) == (3, 0, expected_bytes)
    assert receiver.poll() == []
    sender.close()
    receiver.close()


def test_fake_receiver_from_two_senders() -> None:
    receiver = make_receiver("fake", LAYOUT)
    caches = [random_cache(LAYOUT, 12, seed=s) for s in (1, 2)]
    senders = [make_sender(c) for c in caches]
    plans = [plan_requests(12, list(range(0, 24, 2)), 2, seed=10),  # disjoint destination blocks
             plan_requests(12, list(range(1, 24, 2)), 2, seed=11)]
    for s in senders:
        s.connect("d", receiver.descriptor())
    for s, plan in zip(senders, plans, strict=True):
        run_plan(s, "d", plan, LAYOUT.num_layers)
    done = {d.request_id: d for d in receiver.poll()}
    assert len(done) == 4 and all(d.error is None for d in done.values())
    for cache, plan in zip(caches, plans, strict=True):
        for r in plan:
            assert_request_arrived(receiver, cache, r)
    receiver.close()


def test_fake_fault_injection_and_abort() -> None:
    receiver = FakeReceiver(LAYOUT)
    src = random_cache(LAYOUT, 8, 0)
    sender = FakeSender(src, fail_after_layers=2)
    sender.connect("d", receiver.descriptor())
    sender.send_blocks("d", "r", 0, [0], [1])
    sender.send_blocks("d", "r", 1, [0], [1])
    with pytest.raises(TransferError, match="injected"):
        sender.send_blocks("d", "r", 2, [0], [1])
    sender.send_abort("d", "r", "prefill failed")
    (done,) = receiver.poll()
    assert done.request_id == "r" and done.error == "prefill failed"
    assert done.num_bytes == 2 * 2 * LAYOUT.block_bytes
    assert sender.stats().peers["d"].num_aborted == 1
    assert receiver.stats().num_failed == 1

    lossy = FakeSender(src, drop_done=True, stall_s=0.001)
    lossy.connect("d", receiver.descriptor())
    lossy.send_blocks("d", "q", 0, [1], [2])
    lossy.send_done("d", "q", b"")
    assert receiver.poll() == []  # the notice was lost: D must time out and discard
    receiver.discard("q")
    receiver.close()


def test_discarded_request_is_not_reported() -> None:
    receiver = make_receiver("fake", LAYOUT)
    sender = make_sender(random_cache(LAYOUT, 8, 0))
    sender.connect("d", receiver.descriptor())
    sender.send_blocks("d", "r", 0, [0, 1], [4, 5])
    receiver.discard("r")  # D gave up on r (e.g. timed out)
    sender.send_blocks("d", "r", 1, [0, 1], [4, 5])
    sender.send_done("d", "r", b"late")
    assert receiver.poll() == []
    assert not receiver.kv_caches[1][0].any()  # later writes of r were refused
    receiver.close()


def test_sender_rejects_bad_arguments() -> None:
    receiver = make_receiver("fake", LAYOUT)
    sender = make_sender(random_cache(LAYOUT, 8, 0))
    with pytest.raises(TransferError, match="not connected"):
        sender.send_blocks("d", "r", 0, [0], [0])
    sender.connect("d", receiver.descriptor())
    with pytest.raises(TransferError, match="layer 3"):
        sender.send_blocks("d", "r", 3, [0], [0])
    with pytest.raises(TransferError, match="2 source blocks, 1 destinations"):
        sender.send_blocks("d", "r", 0, [0, 1], [0])
    with pytest.raises(TransferError, match="source block id 8"):
        sender.send_blocks("d", "r", 0, [8], [0])
    with pytest.raises(TransferError, match="destination block id 24"):
        sender.send_blocks("d", "r", 0, [0], [24])
    other = make_receiver("fake", KVLayout(3, 24, 4, 2, 16, "float32"))
    with pytest.raises(TransferError, match="does not match"):
        sender.connect("e", other.descriptor())
    sender.send_blocks("d", "r", 0, [], [])  # nothing to send is fine
    sender.close()
    with pytest.raises(TransferError, match="closed"):
        sender.connect("d", receiver.descriptor())
    receiver.close()
    other.close()


def test_multi_sender_uses_injected_fake_and_reconnects() -> None:
    r1, r2 = make_receiver("fake", LAYOUT), make_receiver("fake", LAYOUT)
    src = random_cache(LAYOUT, 8, 0)
    faulty = FakeSender(src, fail_after_layers=0)
    sender = MultiSender(src, senders={"fake": faulty})
    sender.connect("d", r1.descriptor())
    assert sender.transport_of("d") == "fake"
    with pytest.raises(TransferError, match="injected"):
        sender.send_blocks("d", "r", 0, [0], [0])
    faulty.fail_after_layers = None
    sender.connect("d", r2.descriptor())  # same peer id, new descriptor (the worker restarted)
    sender.send_blocks("d", "r", 0, [0], [0])
    sender.send_done("d", "r", b"")
    assert r1.poll() == [] and len(r2.poll()) == 1
    sender.close()
    r1.close()
    r2.close()


def test_make_receiver_rejects_unknown_transport() -> None:
    with pytest.raises(TransferError, match="unknown transport"):
        make_receiver("rdma", LAYOUT)


def test_descriptor_module_does_not_import_torch() -> None:
    """The router imports KVDescriptor; torch would cost it seconds of start-up."""
    code = ("import sys, msgspec; from pdserve.transfer.descriptor import KVDescriptor, KVLayout; "
            "d = KVDescriptor('shm', 'tcp://h:1', 'h', KVLayout(1, 2, 16, 4, 64, 'bfloat16'), 'seg', 'tk'); "
            "assert msgspec.msgpack.decode(msgspec.msgpack.encode(d), type=KVDescriptor) == d; "
            "assert d.layout.block_bytes == 16 * 4 * 64 * 2; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_descriptor_token_travels_but_is_never_shown() -> None:
    token = "5ec2e7" * 5
    d = KVDescriptor("tcp", "tcp://127.0.0.1:1", "host", LAYOUT, token=token)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(d), type=KVDescriptor).token == token
    assert msgspec.structs.replace(d, token="other") != d  # a new token means a new receiver: reconnect
    shown = [repr(d), str(d), repr([d]), repr(d.__rich_repr__())]
    assert all(token not in text and "<set>" in text for text in shown), shown
    assert "layout=KVLayout(" in repr(d) and "token=<none>" in repr(KVDescriptor("fake", "f", "h", LAYOUT))


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_sender_refuses_a_descriptor_without_token(transport: str) -> None:
    tokenless = KVDescriptor(transport, "tcp://127.0.0.1:1", host_id(), LAYOUT,
                             "seg" if transport == "shm" else None)
    sender = make_sender(random_cache(LAYOUT, 4, 0), override=transport)
    try:
        with pytest.raises(TransferError, match="no token"):
            sender.connect("d", tokenless)
    finally:
        sender.close()
