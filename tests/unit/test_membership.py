"""Workers registering with the router: the checks a ``Register`` passes, the replies, PeerLost on a flip."""

from __future__ import annotations

import random

from pdserve.block_hash import HASH_SCHEME
from pdserve.config import Role
from pdserve.router.dispatch_config import DispatcherConfig
from pdserve.router.membership import Membership
from pdserve.router.placement import Placer
from pdserve.router.registry import Registry
from pdserve.transfer.descriptor import KVDescriptor, KVLayout
from pdserve.worker import protocol as p

BS = 16


def kv(endpoint: str) -> KVDescriptor:
    return KVDescriptor("shm", endpoint, "h", KVLayout(2, 100, BS, 2, 32, "float32"), "seg", "t")


def register(
    wid: str, role: str, kv_endpoint: str | None = None, *, model: str = "tiny", secret: str = "s3",
    block_size: int = BS,
) -> p.Register:
    descriptor = kv(kv_endpoint) if kv_endpoint else None
    return p.Register(wid, role, model, 1, "h", 4096, block_size, 100, kv=descriptor, secret=secret,
                      hash_scheme=HASH_SCHEME)


def membership() -> tuple[Membership, Registry, list[tuple[str, p.Message]]]:
    sent: list[tuple[str, p.Message]] = []
    dispatch = DispatcherConfig(secret="s3", lease_s=30.0, kv_block_size=BS)
    registry = Registry(dispatch.lease_s)
    placer = Placer(dispatch, registry, lambda wid, m: None, rng=random.Random(0))
    members = Membership(dispatch, "tiny", registry, placer, lambda wid, m: sent.append((wid, m)))
    return members, registry, sent


def test_a_good_registration_enters_the_registry_and_gets_its_heartbeat_interval() -> None:
    members, registry, sent = membership()
    members.on_register("sock-d", register("d", "decode", "tcp://127.0.0.1:1"))
    assert [w.worker_id for w in registry.all()] == ["d"]
    assert sent == [("sock-d", p.Registered("d", 5.0))]  # a sixth of the 30 s lease


def test_wrong_secret_or_model_is_dropped_without_a_reply() -> None:
    members, registry, sent = membership()
    members.on_register("x", register("a", "decode", secret="wrong"))
    members.on_register("x", register("b", "decode", secret=""))
    members.on_register("x", register("c", "decode", model="other"))
    assert registry.all() == [] and sent == []


def test_a_cache_index_the_worker_cannot_share_is_refused_with_the_reason() -> None:
    members, registry, sent = membership()
    members.on_register("x", register("p", "prefill", block_size=2 * BS))
    assert registry.all() == []
    [(to, reply)] = sent
    assert to == "x" and isinstance(reply, p.RegisterRefused) and reply.reason


def test_a_worker_back_with_another_kv_endpoint_makes_prefill_and_mixed_peers_forget_its_cache() -> None:
    members, registry, sent = membership()
    for wid, role, endpoint in [("p", "prefill", None), ("m", "mixed", "tcp://m"), ("d", "decode", "tcp://d"),
                                ("f", "decode", "tcp://f1")]:
        members.on_register(wid, register(wid, role, endpoint))
    sent.clear()
    members.on_register("f", register("f", "decode", "tcp://f1"))  # same endpoint: no PeerLost
    assert sent == [("f", p.Registered("f", 5.0))]
    sent.clear()
    members.on_register("f", register("f", "prefill", "tcp://f2"))  # it flipped roles
    assert sent == [("p", p.PeerLost("f")), ("m", p.PeerLost("f")), ("f", p.Registered("f", 5.0))]
    flipped = registry.get("f")
    assert flipped is not None and flipped.role is Role.PREFILL


def test_peer_lost_goes_to_the_named_roles_except_the_worker_itself() -> None:
    members, _, sent = membership()
    for wid, role in [("p", "prefill"), ("m", "mixed"), ("d", "decode")]:
        members.on_register(wid, register(wid, role, f"tcp://{wid}"))
    sent.clear()
    members.peer_lost("m", (Role.DECODE, Role.MIXED))
    assert sent == [("d", p.PeerLost("m"))]
