"""The cost model's bounded-loads rule: cache affinity cannot pile a prefix's users onto one worker."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from types import SimpleNamespace

import pytest

from pdserve.block_hash import HASH_SCHEME
from pdserve.cli import _build_parser
from pdserve.config import Role
from pdserve.launch.serve import router_args
from pdserve.router import cost_model as cm
from pdserve.router.dispatch_config import DispatcherConfig
from pdserve.router.metrics import _routing_metrics
from pdserve.router.placement import Placer
from pdserve.router.registry import Registry, WorkerInfo
from pdserve.sim.simulator import PoolSpec, SimConfig
from pdserve.sim.step_model import LinearStepModel
from pdserve.status import _routing_line
from pdserve.transfer.descriptor import KVDescriptor, KVLayout
from pdserve.worker import protocol as p

BS = 16
PARAMS = cm.CostParams(prefill_rate_tps=1000.0, kv_bytes_per_token=1000, link_bytes_per_s=1e8)
UNBOUNDED = replace(PARAMS, balance_factor=None)
CACHED = {"p0": 60, "m0": 60}  # p0 / m0 hold 960 of the 1024 tokens


def pw(wid: str, inflight: int = 0) -> cm.WorkerSnapshot:
    return cm.WorkerSnapshot(wid, "prefill", prefill_rate_tps=1000.0, num_inflight=inflight)


def mw(wid: str, inflight: int = 0) -> cm.WorkerSnapshot:
    """A mixed worker of an aggregated pool (no KV hand-off: local placements only)."""
    return cm.WorkerSnapshot(wid, "mixed", prefill_rate_tps=1000.0, kv_handoff=False, num_inflight=inflight)


D = cm.WorkerSnapshot("d", "decode", prefill_rate_tps=1000.0)


def plan(prefill: list[cm.WorkerSnapshot], local: list[cm.WorkerSnapshot], policy: str = "always",
         params: cm.CostParams = PARAMS, seed: int = 0) -> cm.Placement:
    placement = cm.plan(1024, 16, CACHED, BS, prefill, local, params, random.Random(seed), policy)
    assert placement is not None
    return placement


def test_the_bound_is_c_times_the_pool_mean_plus_slack() -> None:
    # 3 workers, 6 in flight: with this request, mean 7/3; bound 1.25 * 7/3 + 2 = 4.92 after taking it
    assert cm.over_bound([pw("a", 4), pw("b", 1), pw("c", 1)], PARAMS) == {"a"}  # 5 > 4.92
    assert cm.over_bound([pw("a", 2), pw("b", 2), pw("c", 2)], PARAMS) == set()
    assert cm.over_bound([pw("a", 3), pw("b", 2), pw("c", 1)], PARAMS) == set()  # 4 <= 4.92
    assert cm.over_bound([pw("a", 5), pw("b", 1), pw("c", 1)], PARAMS) == {"a"}  # 6 > 1.25 * 8/3 + 2
    # a prefix's home with one or two in flight while its peers idle keeps the next request
    assert cm.over_bound([pw("a", 1), pw("b", 0), pw("c", 0)], PARAMS) == set()  # 2 <= 2.83
    assert cm.over_bound([pw("a", 2), pw("b", 0), pw("c", 0)], PARAMS) == set()  # 3 <= 3.25
    assert cm.over_bound([pw("a", 3), pw("b", 0), pw("c", 0)], PARAMS) == {"a"}  # 4 > 3.67
    assert cm.over_bound([pw("a", 0), pw("b", 0), pw("c", 0)], PARAMS) == set()  # idle
    assert cm.over_bound([pw("a", 50)], PARAMS) == set()  # a pool of one has no one to spill to
    assert cm.over_bound([pw("a", 9), pw("b", 0)], UNBOUNDED) == set()
    # without slack nobody may take a request in an idle pool of 3: then no one is left out
    assert cm.over_bound([pw("a"), pw("b"), pw("c")], replace(PARAMS, balance_slack=0.0)) == set()
    with pytest.raises(ValueError, match="balance_factor"):
        cm.CostParams(balance_factor=0.9)


def test_an_overloaded_cached_prefill_worker_loses_to_one_within_the_bound() -> None:
    prefill = [pw("p0", 4), pw("p1", 1), pw("p2", 1)]
    for seed in range(10):
        chosen = plan(prefill, [D], seed=seed)
        assert chosen.prefill_id in ("p1", "p2") and chosen.num_cached_tokens == 0
        assert chosen.balanced
    # without the bound the cache wins, however loaded p0 is
    assert plan(prefill, [D], params=UNBOUNDED).prefill_id == "p0"


def test_below_the_bound_the_cached_worker_still_wins() -> None:
    chosen = plan([pw("p0", 2), pw("p1", 1), pw("p2", 1)], [D])  # 3 <= 1.25 * 5/3 + 1
    assert chosen.prefill_id == "p0" and chosen.num_cached_tokens == 960 and not chosen.balanced


def test_an_idle_pool_keeps_its_cache_affinity() -> None:
    assert plan([pw("p0"), pw("p1"), pw("p2")], [D]).prefill_id == "p0"
    assert plan([], [mw("m0"), mw("m1"), mw("m2")], "auto").decode_id == "m0"


def test_the_local_choice_is_bounded_too() -> None:
    local = [mw("m0", 4), mw("m1", 1), mw("m2", 1)]
    chosen = plan([], local, "auto")
    assert chosen.prefill_id is None and chosen.decode_id in ("m1", "m2") and chosen.balanced
    assert plan([], local, "auto", params=UNBOUNDED).decode_id == "m0"
    # a decode worker alone is its own pool: never bounded (it is the only local option)
    heavy_d = replace(D, num_inflight=30)
    assert plan([pw("p1"), pw("p2")], [heavy_d], "never").decode_id == "d"


def burst(params: cm.CostParams, n: int, disagg: bool) -> tuple[Counter[str], int]:
    """``n`` requests with one prefix arrive before any ends; each worker that computes the prefix
    holds it from then on. Returns requests per computing worker and how many found it cached."""
    rng = random.Random(3)
    inflight: Counter[str] = Counter()
    holds: dict[str, int] = {}
    hits = 0
    ids = ["p0", "p1", "p2"] if disagg else ["m0", "m1", "m2"]
    for _ in range(n):
        pool = [(pw if disagg else mw)(w, inflight[w]) for w in ids]
        chosen = cm.plan(1024, 16, holds, BS, pool if disagg else [], [D] if disagg else pool, params, rng,
                         "always" if disagg else "auto")
        assert chosen is not None
        worker = chosen.prefill_id or chosen.decode_id
        hits += chosen.num_cached_tokens > 0
        holds[worker] = 60
        inflight[worker] += 1
    return inflight, hits


@pytest.mark.parametrize("disagg", [True, False], ids=["prefill pool", "aggregated pool"])
def test_a_burst_with_one_prefix_spreads_and_stays_mostly_cached(disagg: bool) -> None:
    n = 48
    counts, hits = burst(PARAMS, n, disagg)
    assert len(counts) == 3 and max(counts.values()) / (n / 3) <= 1.5, counts
    assert hits >= n - 3  # only the first request on each worker computes the prefix
    herded, _ = burst(UNBOUNDED, n, disagg)
    assert herded.most_common(1)[0][1] == n  # what the bound prevents: all on the first home


def test_the_placer_feeds_the_rule_with_its_in_flight_counts() -> None:
    registry = Registry()
    placer = Placer(DispatcherConfig(disagg_policy="always"), registry, lambda wid, m: None,
                    rng=random.Random(0))
    for wid, role in (("p0", Role.PREFILL), ("p1", Role.PREFILL), ("p2", Role.PREFILL), ("d0", Role.DECODE)):
        m = p.Register(wid, role.value, "tiny", 1, "h", 4096, BS, 100, hash_scheme=HASH_SCHEME, kv_epoch=7)
        assert placer.on_register(m) is None
        registry.add(WorkerInfo.from_register(m))
        placer.on_snapshot(p.KVSnapshot(wid, 7, 0, []))
    assert placer.cost_params.balance_factor == 1.25
    doc = list(range(100, 260))
    prefill, decode = registry.by_role(Role.PREFILL), registry.by_role(Role.DECODE)
    first = placer.place([*doc, 1], 8, prefill, decode)  # the speculative entry makes it doc's home
    assert first is not None and first.prefill_id is not None
    home = registry.get(first.prefill_id)
    assert home is not None
    home.num_inflight = 3
    moved = placer.place([*doc, 2], 8, prefill, decode)
    assert moved is not None and moved.prefill_id != home.worker_id and moved.balanced
    assert placer.summary()["balanced"] == 1
    # visible: /metrics and pdserve status's routing line
    families = {f.name: f for f in _routing_metrics(SimpleNamespace(placer=placer, registry=registry))}  # type: ignore[arg-type]
    assert families["pdserve_placements_balanced"].samples[0].value == 1
    assert "moved by the load bound 1" in _routing_line(placer.summary())
    second = registry.get(moved.prefill_id or "")
    assert second is not None  # a second home now (its speculative entry): loaded, it spills back
    home.num_inflight, second.num_inflight = 1, 3
    stays = placer.place([*doc, 3], 8, prefill, decode)
    assert stays is not None and stays.prefill_id == home.worker_id and stays.num_cached_tokens == 160


def test_the_factor_reaches_the_placer_and_survives_registration() -> None:
    for factor in (None, 2.0):
        placer = Placer(DispatcherConfig(balance_factor=factor), Registry(), lambda wid, m: None)
        kv = KVDescriptor("shm", "tcp://127.0.0.1:1", "h", KVLayout(2, 100, BS, 2, 32, "float32"), "seg", "t")
        m = p.Register("d0", "decode", "tiny", 1, "h", 4096, BS, 100, kv=kv, hash_scheme=HASH_SCHEME,
                       kv_epoch=7)
        assert placer.on_register(m) is None
        assert placer.cost_params.kv_bytes_per_token > 0  # the layout wrote it...
        assert placer.cost_params.balance_factor == factor  # ...and kept the factor
    with pytest.raises(ValueError, match="balance_factor"):
        DispatcherConfig(balance_factor=0.5)
    pools = (PoolSpec(Role.MIXED, 3, LinearStepModel((2e-3, 1e-4, 0.0, 1e-7, 1e-5)), 110),)
    assert SimConfig(pools=pools).routing.balance_factor == 1.25  # the router's default
    assert SimConfig(pools=pools, balance_factor=None).routing.balance_factor is None
    parser, _ = _build_parser()
    out = router_args(parser.parse_args(["serve", "--balance-factor", "1.5"]))
    assert out[out.index("--balance-factor") + 1] == "1.5"  # serve hands it to its router
    assert parser.parse_args(["router", "--balance-factor", "0"]).balance_factor == 0  # off
    with pytest.raises(SystemExit):
        parser.parse_args(["router", "--balance-factor", "0.5"])
