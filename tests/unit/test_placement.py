"""The router's placement: registration checks, index-driven choices, charges that never drift."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

from pdserve.block_hash import HASH_SCHEME
from pdserve.config import Role
from pdserve.router.dispatch_config import DispatcherConfig
from pdserve.router.placement import Placer
from pdserve.router.registry import Registry, WorkerInfo
from pdserve.router.worker_perf import WorkerPerf
from pdserve.worker import protocol as p

BS = 16


def register(wid: str, role: Role, block_size: int = BS, scheme: str = HASH_SCHEME) -> p.Register:
    return p.Register(wid, role.value, "tiny", 1, "h", 4096, block_size, 100, hash_scheme=scheme, kv_epoch=7)


THREE_P_ONE_D = (("p0", Role.PREFILL), ("p1", Role.PREFILL), ("p2", Role.PREFILL), ("d0", Role.DECODE))


def setup(
    policy: str = "kv_aware",
    disagg: str = "always",
    workers: Sequence[tuple[str, Role]] = THREE_P_ONE_D,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[Placer, Registry, list[tuple[str, object]]]:
    registry = Registry()
    sent: list[tuple[str, object]] = []
    config = DispatcherConfig(policy=policy, disagg_policy=disagg)
    placer = Placer(config, registry, lambda wid, m: sent.append((wid, m)), rng=random.Random(0), clock=clock)
    for wid, role in workers:
        m = register(wid, role)
        assert placer.on_register(m) is None
        registry.add(WorkerInfo.from_register(m))
        placer.on_snapshot(p.KVSnapshot(wid, 7, 0, []))
    return placer, registry, sent


def test_registration_asks_for_a_snapshot_and_refuses_mismatches() -> None:
    placer, _, sent = setup()
    assert ("p0", p.KVSnapshotRequest()) in sent
    refusal = placer.on_register(register("x", Role.PREFILL, block_size=32))
    assert refusal is not None and "block size 32" in refusal
    refusal = placer.on_register(register("y", Role.PREFILL, scheme="python-hash"))
    assert refusal is not None and "hashing" in refusal


def test_prompt_goes_to_the_worker_whose_events_say_it_holds_it() -> None:
    placer, registry, _ = setup()
    doc = list(range(100, 260))  # 10 blocks
    hashes = placer.index.hash_prompt([*doc, 1])
    events = [p.KVEvent(0, h, hashes[i - 1] if i else None) for i, h in enumerate(hashes)]
    placer.on_events(p.KVEvents("p2", 7, 1, events))
    prefill = registry.by_role(Role.PREFILL)
    decode = registry.by_role(Role.DECODE)
    for suffix in range(5):
        placement = placer.place([*doc, 1000 + suffix, 3, 4], 8, prefill, decode)
        assert placement is not None and placement.prefill_id == "p2"
        assert placement.num_cached_tokens == 160 and placement.reason == "forced_remote"
    assert placer.decisions["forced_remote"] == 5


def test_charges_are_credited_once() -> None:
    placer, registry, _ = setup()
    charge = placer.charge("p0", 500)
    assert registry.get("p0").perf.queued_prefill_tokens == 500  # type: ignore[union-attr]
    placer.credit(charge)
    placer.credit(None)
    assert registry.get("p0").perf.queued_prefill_tokens == 0  # type: ignore[union-attr]
    assert placer.charge("ghost", 10) is None


def test_a_lost_batch_asks_for_a_snapshot_and_removal_drops_entries() -> None:
    placer, _, sent = setup()
    sent.clear()
    placer.on_events(p.KVEvents("p1", 7, 2, []))  # batch 1 never arrived
    assert sent == [("p1", p.KVSnapshotRequest())]
    placer.on_heartbeat(p.Heartbeat("p0", p.WorkerLoad(), 7, 3))
    assert ("p0", p.KVSnapshotRequest()) in sent
    placer.worker_removed("p0")
    assert "p0" not in placer.index.workers


def test_round_robin_still_cycles_and_auto_decides_the_site() -> None:
    placer, registry, _ = setup(policy="round_robin", disagg="auto")
    prefill, decode = registry.by_role(Role.PREFILL), registry.by_role(Role.DECODE)
    short = [placer.place([5, 6, 7], 4, prefill, decode) for _ in range(3)]
    assert all(pl is not None and pl.prefill_id is None and pl.reason == "local_short" for pl in short)


def test_a_worker_not_measured_yet_is_priced_like_its_measured_peers() -> None:
    """A fast measured decode worker must not keep every stream from a new one.

    Priced at the defaults (20 ms a step), a new worker lost to a measured 3 ms
    worker until that one ran seven streams, and so was never measured.
    """
    placer, registry, _ = setup()
    m = register("d1", Role.DECODE)
    assert placer.on_register(m) is None
    registry.add(WorkerInfo.from_register(m))
    placer.on_snapshot(p.KVSnapshot("d1", 7, 0, []))
    d0, d1 = registry.get("d0"), registry.get("d1")
    assert d0 is not None and d1 is not None
    d0.perf.decode_step_s, d0.perf.decode_batch = 0.003, 1.0  # measured; d1 not yet
    prefill, decode = registry.by_role(Role.PREFILL), registry.by_role(Role.DECODE)
    seen: set[str] = set()
    for _ in range(4):  # four concurrent streams: each dispatch counts as in flight
        placement = placer.place([1, 2, 3], 64, prefill, decode)
        assert placement is not None
        seen.add(placement.decode_id)
        registry.get(placement.decode_id).num_inflight += 1  # type: ignore[union-attr]
    assert seen == {"d0", "d1"}
    assert placer._peer_means().decode_step_s == 0.003


def test_queued_work_is_counted_down_at_the_measured_rate() -> None:
    perf = WorkerPerf()
    first = perf.charge(1000, now_s=10.0)
    perf.charge(500, now_s=10.2)
    assert perf.queued_at(10.0, None) == 1500  # no rate: nothing counted as done
    assert perf.queued_at(10.6, 1000.0) == 900  # 600 of the first done; the second waits behind it
    assert perf.queued_at(11.2, 1000.0) == 300
    assert perf.queued_at(12.0, 1000.0) == 0  # predicted done, not credited yet
    perf.credit(first)
    perf.credit(first)  # once only
    assert perf.queued_prefill_tokens == 500


def test_a_document_being_computed_keeps_its_next_request_once_mostly_done() -> None:
    """The second user of a document arrives while its first prompt computes: once most of that is
    done, waiting for it (then reusing its cache) beats computing the document again elsewhere."""
    now = [0.0]
    placer, registry, _ = setup(clock=lambda: now[0])
    for w in registry.all():
        w.perf.prefill_rate_tps = 1000.0
    doc = list(range(100, 1124))
    prefill, decode = registry.by_role(Role.PREFILL), registry.by_role(Role.DECODE)
    first = placer.place([*doc, 1, 2, 3], 8, prefill, decode)
    assert first is not None and first.prefill_id is not None
    placer.charge(first.prefill_id, 1027)
    now[0] = 0.7  # 700 of its 1,027 tokens computed
    second = placer.place([*doc, 4, 5, 6], 8, prefill, decode)
    assert second is not None and second.prefill_id == first.prefill_id
    assert second.num_cached_tokens == 1024  # the speculative entries of the first


def test_equal_mixed_workers_are_priced_by_the_pools_decode_fit_not_their_own_mean_step() -> None:
    """Three equal workers whose own mean decode steps differ only by the batches they ran
    (16, 28, 22 ms at batch 1, 3, 2 of one model, step = 10 ms + 6 ms × batch): three new documents
    spread over them, rather than all going to the one that ran the smallest batches."""
    batches = {"m0": 1, "m1": 3, "m2": 2}
    placer, registry, _ = setup(disagg="auto", workers=[(wid, Role.MIXED) for wid in batches])
    for wid, batch in batches.items():
        registry.heartbeat(wid, p.WorkerLoad())
        for i in range(1, 5):  # intervals of 50 steps each
            steps = 50 * i
            registry.heartbeat(wid, p.WorkerLoad(num_decode_steps=steps, num_decode_seqs=steps * batch,
                                                 decode_busy_s=steps * (0.010 + 0.006 * batch)))
    own = {w.worker_id: round(w.perf.decode_step_s * 1000) for w in registry.all()}  # type: ignore[operator]
    assert own == {"m0": 16, "m1": 28, "m2": 22}
    mixed = registry.by_role(Role.MIXED)
    homes = set()
    for doc in range(3):
        placement = placer.place([1000 * (doc + 1) + i for i in range(1024)], 16, [], mixed)
        assert placement is not None and placement.prefill_id is None
        homes.add(placement.decode_id)
    assert homes == {"m0", "m1", "m2"}
