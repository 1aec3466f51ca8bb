"""Mixed workers on both sides of a KV hand-off: the cost model's choices and the router's candidates.

A mixed worker computes and decodes its own requests, and can also be the
prefill side for a decode worker (M→D), the decode side for a prefill worker
(P→M); a worker is never paired with itself (that is the local option), and
two mixed workers never with each other (their reservations could wait on
each other's prefills for ever).
"""

from __future__ import annotations

import random
from collections import Counter

from pdserve.block_hash import HASH_SCHEME
from pdserve.config import Role
from pdserve.router import cost_model as cm
from pdserve.router.dispatch_config import DispatcherConfig
from pdserve.router.placement import Placer, local_candidates, prefill_candidates
from pdserve.router.registry import Registry, WorkerInfo
from pdserve.transfer.descriptor import KVDescriptor, KVLayout
from pdserve.worker import protocol as p

BS = 16
PARAMS = cm.CostParams(prefill_rate_tps=1000.0, kv_bytes_per_token=1000, link_bytes_per_s=1e8)


def w(wid: str, role: str, running: int = 0, queued: int = 0, usage: float = 0.0,
      kv_handoff: bool = True) -> cm.WorkerSnapshot:
    return cm.WorkerSnapshot(wid, role, queued_prefill_tokens=queued, prefill_rate_tps=1000.0,
                             num_running=running, kv_usage=usage, kv_handoff=kv_handoff)


def plan(prefill: list[cm.WorkerSnapshot], local: list[cm.WorkerSnapshot], num_tokens: int = 1000,
         policy: str = "auto", cached: dict[str, int] | None = None, seed: int = 0) -> cm.Placement:
    placement = cm.plan(num_tokens, 16, cached or {}, BS, prefill, local, PARAMS, random.Random(seed), policy)
    assert placement is not None
    return placement


def test_mixed_prefills_for_a_decode_worker_busy_prefilling() -> None:
    m, d = w("m", "mixed", running=2), w("d", "decode", running=1, queued=5000)
    chosen = plan([m], [m, d])
    assert (chosen.prefill_id, chosen.decode_id, chosen.reason) == ("m", "d", cm.REMOTE)
    assert chosen.num_moved_tokens == 1000
    # D idle: D computes the prompt itself (no P→D hand-off is worth it for D's own queue)
    idle = plan([m], [m, w("d", "decode", running=1)])
    assert idle.prefill_id is None


def test_mixed_decodes_for_a_prefill_worker_when_decode_is_loaded() -> None:
    pw, m, d = w("p", "prefill"), w("m", "mixed", running=1), w("d", "decode", running=30, usage=0.95)
    chosen = plan([pw, m], [m, d], num_tokens=2000)
    assert (chosen.prefill_id, chosen.decode_id, chosen.reason) == ("p", "m", cm.REMOTE)


def test_local_still_wins_for_short_prompts() -> None:
    pw, m, d = w("p", "prefill"), w("m", "mixed"), w("d", "decode")
    for seed in range(20):
        chosen = plan([pw, m], [m, d], num_tokens=12, seed=seed)
        assert chosen.prefill_id is None and chosen.num_moved_tokens == 0
        assert chosen.reason in (cm.AGGREGATED, cm.LOCAL_SHORT)
    only_mixed = plan([m], [m], num_tokens=12)
    assert only_mixed.prefill_id is None and only_mixed.reason == cm.AGGREGATED


def test_a_worker_is_never_paired_with_itself() -> None:
    m = w("m", "mixed")
    for policy in ("auto", "always"):
        chosen = plan([m], [m], num_tokens=4000, policy=policy)
        assert chosen.prefill_id is None and chosen.decode_id == "m" and chosen.reason == cm.AGGREGATED


def test_mixed_workers_never_hand_off_to_each_other() -> None:
    m0, m1 = w("m0", "mixed"), w("m1", "mixed")
    homes = Counter()
    for policy in ("auto", "always"):
        for seed in range(40):
            chosen = plan([m0, m1], [m0, m1], num_tokens=64, policy=policy, seed=seed)
            assert chosen.prefill_id is None and chosen.reason == cm.AGGREGATED
            homes[chosen.decode_id] += 1
    assert set(homes) == {"m0", "m1"}  # equal workers share the burst
    # beside a dedicated decode worker, always pairs a mixed worker with it, not with the other one
    d = w("d", "decode")
    chosen = plan([m0, m1], [m0, m1, d], num_tokens=64, policy="always")
    assert chosen.decode_id == "d" and chosen.prefill_id in ("m0", "m1")


def test_never_keeps_mixed_workers_local() -> None:
    pw, m, d = w("p", "prefill"), w("m", "mixed"), w("d", "decode", running=8)
    chosen = plan([pw, m], [m, d], num_tokens=4000, policy="never")
    assert chosen.prefill_id is None and chosen.reason in (cm.AGGREGATED, cm.FORCED_LOCAL)


def test_mixed_without_a_kv_channel_stays_local() -> None:
    pw, old = w("p", "prefill"), w("m", "mixed", kv_handoff=False)
    chosen = plan([pw, old], [old], num_tokens=4000, policy="always")
    assert chosen.prefill_id is None and chosen.decode_id == "m" and chosen.reason == cm.AGGREGATED


def test_mixed_prefill_is_charged_the_stall_of_its_own_streams() -> None:
    # Two equal idle prefill-side candidates but the mixed one decodes 40 streams: P wins.
    pw, m, d = w("p", "prefill"), w("m", "mixed", running=40), w("d", "decode")
    for seed in range(10):
        assert plan([pw, m], [d], num_tokens=2000, policy="always", seed=seed).prefill_id == "p"


# -- the router's candidates ---------------------------------------------------------------------


def descriptor() -> KVDescriptor:
    return KVDescriptor("shm", "tcp://127.0.0.1:1", "h", KVLayout(2, 100, BS, 2, 32, "float32"), "seg", "t")


def registry_of(*workers: tuple[str, Role, bool]) -> tuple[Placer, Registry]:
    registry = Registry()
    placer = Placer(DispatcherConfig(policy="round_robin", disagg_policy="always"), registry,
                    lambda wid, m: None, rng=random.Random(0))
    for wid, role, with_kv in workers:
        m = p.Register(wid, role.value, "tiny", 1, "h", 4096, BS, 100, kv=descriptor() if with_kv else None,
                       hash_scheme=HASH_SCHEME, kv_epoch=1)
        assert placer.on_register(m) is None
        registry.add(WorkerInfo.from_register(m))
    return placer, registry


def pools(registry: Registry) -> dict[Role, list[WorkerInfo]]:
    return {role: registry.by_role(role) for role in Role}


def ids(workers: list[WorkerInfo]) -> list[str]:
    return [x.worker_id for x in workers]


def test_mixed_workers_are_candidates_for_both_stages() -> None:
    _, reg = registry_of(("p", Role.PREFILL, False), ("m", Role.MIXED, True), ("old", Role.MIXED, False),
                         ("d", Role.DECODE, True))
    assert ids(prefill_candidates(pools(reg))) == ["p", "m"]  # a mixed worker without KV channel: local only
    assert ids(local_candidates(pools(reg), prefill_fallback=False)) == ["m", "old", "d"]
    # with a mixed worker able to prefill for it, a decode worker may prefill locally without a prefill pool
    _, reg = registry_of(("m", Role.MIXED, True), ("d", Role.DECODE, True))
    assert ids(local_candidates(pools(reg), prefill_fallback=False)) == ["m", "d"]
    _, reg = registry_of(("old", Role.MIXED, False), ("d", Role.DECODE, True))
    assert ids(local_candidates(pools(reg), prefill_fallback=False)) == ["old"]


def test_round_robin_with_only_mixed_workers_cycles_them_aggregated() -> None:
    placer, reg = registry_of(("m0", Role.MIXED, True), ("m1", Role.MIXED, True))
    homes = []
    for _ in range(4):
        placement = placer.place(list(range(40)), 8, prefill_candidates(pools(reg)),
                                 local_candidates(pools(reg), True))
        assert placement is not None and placement.reason == cm.AGGREGATED and placement.prefill_id is None
        homes.append(placement.decode_id)
    assert sorted(homes) == ["m0", "m0", "m1", "m1"]
    assert placer.decisions == Counter({cm.AGGREGATED: 4})
