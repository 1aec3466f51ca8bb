"""The simulator routes with the router's own placement: cache index, cost model, local prefill on D."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from pdserve.block_hash import hash_blocks
from pdserve.config import Role, SchedulerConfig
from pdserve.router import cost_model as cm
from pdserve.sim.link import LinkModel
from pdserve.sim.simulator import PoolSpec, SimConfig, SimRequest, SimResult, Simulator
from pdserve.sim.step_model import LinearStepModel

BS = 16
KV_BYTES = 1000  # per token
# 2 ms per step + 0.1 ms per token: a 512-token document costs ~50 ms to compute, a decode step ~2 ms
STEP = LinearStepModel((2e-3, 1e-4, 0.0, 1e-7, 1e-5))
LINK = LinkModel(1e9, 1e-4)
SCHED = SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=32, chunk_size=512)


def config(*pools: PoolSpec, **kw: object) -> SimConfig:
    return replace(SimConfig(pools=pools, scheduler=SCHED, block_size=BS, max_model_len=8192, num_layers=4,
                             kv_bytes_per_token=KV_BYTES), **kw)  # type: ignore[arg-type]


def tokens(seed: int, n: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randrange(3, 30000) for _ in range(n))


def shared_prefix_requests(num_docs: int = 6, num: int = 36, gap_s: float = 0.15) -> list[SimRequest]:
    """Documents of 512 tokens, each asked about several times in a seeded random order."""
    docs = [tokens(100 + d, 512) for d in range(num_docs)]
    order = random.Random(7)
    return [SimRequest(i * gap_s, docs[order.randrange(num_docs)] + tokens(i, 20), 4) for i in range(num)]


def computing(result: SimResult) -> list[str]:
    return [r.prefill_id or r.decode_id for r in result.routes]


def cached_tokens(result: SimResult) -> int:
    return sum(r.num_cached_tokens or 0 for r in result.records)


def all_clean(sim: Simulator, result: SimResult) -> None:
    assert all(r.ok for r in result.records)
    for w in sim.by_id.values():
        assert w.block_manager.stats().num_used_blocks == 0, w.worker_id
        assert not w.scheduler.held and not w.scheduler.has_unfinished_requests()
        info = sim.router.info(w.worker_id)
        assert info.num_inflight == 0 and info.perf.queued_prefill_tokens == 0


# a worker's cache holds three of the six documents
SHAPES = {
    "3 mixed": (PoolSpec(Role.MIXED, 3, STEP, 110),),
    "3 prefill + 1 decode": (PoolSpec(Role.PREFILL, 3, STEP, 110, link=LINK),
                             PoolSpec(Role.DECODE, 1, STEP, 400)),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_kv_aware_sends_a_shared_prefix_where_it_is_cached(shape: str) -> None:
    requests = shared_prefix_requests()
    kw = {"disagg_policy": "always"} if "prefill" in shape else {}
    runs = {}
    for policy in ("kv_aware", "round_robin"):
        sim = Simulator(config(*SHAPES[shape], policy=policy, **kw))  # type: ignore[arg-type]
        runs[policy] = result = sim.run(requests)
        all_clean(sim, result)
    kv, rr = runs["kv_aware"], runs["round_robin"]
    # every request of a document after its first is computed where the first one was
    first_of: dict[tuple[int, ...], str] = {}
    for req, worker in zip(requests, computing(kv), strict=True):
        doc = req.prompt_token_ids[:512]
        assert first_of.setdefault(doc, worker) == worker
    assert len(set(first_of.values())) == 3  # and the documents are spread over the workers
    # all but the first request of each document find its 512 tokens cached
    assert cached_tokens(kv) == (len(requests) - len(first_of)) * 512
    assert cached_tokens(rr) < cached_tokens(kv) * 0.65  # round robin: 60% here


def pd_requests() -> list[SimRequest]:
    """Four short prompts with long outputs keep D busy; then a long prompt and a short one."""
    reqs = [SimRequest(0.01 * i, tokens(i, 24), 300) for i in range(4)]
    return [*reqs, SimRequest(0.25, tokens(11, 8), 4), SimRequest(0.3, tokens(10, 1500), 4)]


def test_auto_prefills_on_an_idle_d_and_remotely_while_d_decodes() -> None:
    """The first short prompt finds D idle: computed there. The next ones find D decoding: computing
    them there would stall its streams for as long (the interference), so P computes them, long or
    short."""
    pools = (PoolSpec(Role.PREFILL, 1, STEP, 400, link=LINK), PoolSpec(Role.DECODE, 1, STEP, 400))
    sim = Simulator(config(*pools))
    result = sim.run(pd_requests())
    all_clean(sim, result)
    reasons = [r.reason for r in result.routes]
    assert reasons == ["local_short"] + ["remote_cheaper"] * 5
    for route in result.routes:
        if route.reason == "local_short":
            assert route.prefill_id is None and route.decode_id == "decode-0" and route.kv_bytes == 0
    long = result.routes[5]
    assert long.prefill_id == "prefill-0" and long.kv_bytes == 1500 * KV_BYTES
    assert result.kv_bytes == sum(r.kv_bytes for r in result.routes[1:]) > 1500 * KV_BYTES
    assert result.decisions == {"local_short": 1, "remote_cheaper": 5}
    # the rates came from the heartbeats; these hand-offs streamed behind P's compute (1.5 MB on a
    # 1 GB/s link), so their bytes/time measured P, not the link: no link rate was learned from them
    d = sim.router.info("decode-0").perf
    assert d.link_bytes_per_s is None and d.decode_step_s is not None
    assert sim.router.info("prefill-0").perf.prefill_rate_tps is not None


def test_a_slow_link_is_learned_from_transfers_that_outlast_the_compute() -> None:
    slow = LinkModel(2e6, 1e-4)  # 1,500 tokens' KV (1.5 MB) take 0.75 s; their compute ~0.15 s
    pools = (PoolSpec(Role.PREFILL, 1, STEP, 400, link=slow), PoolSpec(Role.DECODE, 1, STEP, 400))
    sim = Simulator(config(*pools, disagg_policy="always"))
    all_clean(sim, sim.run(pd_requests()))
    rate = sim.router.info("decode-0").perf.link_bytes_per_s
    assert rate is not None and 1.5e6 < rate < 2.5e6


def test_always_moves_every_prompt_and_never_moves_none() -> None:
    pools = (PoolSpec(Role.PREFILL, 1, STEP, 400, link=LINK), PoolSpec(Role.DECODE, 1, STEP, 400))
    requests = pd_requests()
    sim = Simulator(config(*pools, disagg_policy="always"))
    result = sim.run(requests)
    all_clean(sim, result)
    assert result.decisions == {"forced_remote": len(requests)}
    assert [r.kv_bytes for r in result.routes] == [len(q.prompt_token_ids) * KV_BYTES for q in requests]
    sim = Simulator(config(*pools, disagg_policy="never"))
    result = sim.run(requests)
    all_clean(sim, result)
    assert result.decisions == {"forced_local": len(requests)} and result.kv_bytes == 0
    assert sim.by_id["prefill-0"].num_steps == 0


def test_a_prefill_waits_at_the_gate_until_its_decode_worker_reserved_blocks() -> None:
    pools = (PoolSpec(Role.PREFILL, 1, STEP, 400, link=LINK), PoolSpec(Role.DECODE, 1, STEP, 10))
    sim = Simulator(config(*pools, disagg_policy="always"), record_steps=True)
    # D holds 10 blocks: the first request's (7, growing to 9) leave no room for the second's 7
    result = sim.run([SimRequest(0.0, tokens(1, 100), 40), SimRequest(0.001, tokens(2, 100), 4)])
    all_clean(sim, result)
    assert result.steps is not None
    first_done = max(s.start_s + s.duration_s for s in result.steps
                     if s.worker_id == "decode-0" and any(rid == "sim-0" for rid, _ in s.batch))
    second_starts = min(s.start_s for s in result.steps
                        if s.worker_id == "prefill-0" and any(rid == "sim-1" for rid, _ in s.batch))
    assert second_starts > first_done  # P computed nothing of it before D had room
    assert sim.by_id["decode-0"].load().num_deferred_reservations == 1
    # both waited at the gate with P idle: the first for its reservation's two hops, the second for room
    assert sim.by_id["prefill-0"].load().num_gate_waits == 2


def pdm_config(seed: int = 0) -> SimConfig:
    # the mixed worker has a KV link: it takes part in hand-offs on both sides, as a real one does
    return config(PoolSpec(Role.PREFILL, 1, STEP, 400, link=LINK), PoolSpec(Role.DECODE, 1, STEP, 400),
                  PoolSpec(Role.MIXED, 1, STEP, 400, link=LINK), seed=seed)


def pdm_requests() -> list[SimRequest]:
    rng = random.Random(3)
    return [SimRequest(0.02 * i, tokens(i, rng.choice((20, 300, 1200))), rng.randrange(2, 60))
            for i in range(40)]


def test_prefill_decode_and_mixed_pools_together_run_to_completion() -> None:
    sim = Simulator(pdm_config())
    result = sim.run(pdm_requests())
    all_clean(sim, result)
    assert sum(result.decisions.values()) == 40
    pairs = {(r.prefill_id, r.decode_id) for r in result.routes}
    # local on D and on M, P→D, and M as the decode side (M→D, which stalls M's own streams, is left to
    # test_mixed_placement's hand-built loads: on this one P is always the cheaper prefill side)
    expected = {(None, "decode-0"), (None, "mixed-0"), ("prefill-0", "decode-0"), ("prefill-0", "mixed-0")}
    assert expected <= pairs
    assert result.decisions.get("aggregated", 0) > 0
    assert all(r.kv_bytes > 0 for r in result.routes if r.prefill_id is not None)


def test_mixed_workers_alone_stay_aggregated_under_every_policy() -> None:
    """Mixed to mixed hand-offs are never placed: under ``always`` they deadlocked (each cache full of
    reservations waiting on the other's prefills: 28 of these 40 requests stalled)."""
    requests = pdm_requests()
    for policy in ("auto", "always"):
        sim = Simulator(config(PoolSpec(Role.MIXED, 2, STEP, 400, link=LINK), disagg_policy=policy))
        result = sim.run(requests)
        all_clean(sim, result)
        assert result.decisions == {"aggregated": len(requests)} and result.kv_bytes == 0


def test_the_computing_worker_is_charged_until_its_first_token() -> None:
    sim = Simulator(config(PoolSpec(Role.MIXED, 3, STEP, 400)))
    queued: list[int] = []
    place = sim.router.placer.place

    def spy(*args: object, **kwargs: object) -> object:
        queued.append(sum(w.perf.queued_prefill_tokens for w in sim.router.registry.all()))
        return place(*args, **kwargs)  # type: ignore[arg-type]
    sim.router.placer.place = spy  # type: ignore[method-assign]
    burst = [SimRequest(0.0001 * i, tokens(i, 1000), 2) for i in range(3)]
    result = sim.run([*burst, SimRequest(1.0, tokens(9, 1000), 2)])
    all_clean(sim, result)
    assert queued == [0, 1000, 2000, 0]  # charged at placement, credited on the first token
    assert len({r.decode_id for r in result.routes[:3]}) == 3  # so the burst spreads


def test_same_seed_same_run() -> None:
    def run(seed: int) -> tuple[list[object], list[object], dict[str, int]]:
        result = Simulator(pdm_config(seed)).run(pdm_requests())
        return [r.to_json() for r in result.records], [vars(r) for r in result.routes], result.decisions

    assert run(0) == run(0)


def test_a_decision_is_cost_model_plan_on_the_workers_true_caches() -> None:
    """Wiring: after a run, the index holds exactly what the workers' block managers cache, and
    the simulator's placement equals ``cost_model.plan`` over those caches and the registry's figures."""
    sim = Simulator(config(*SHAPES["3 prefill + 1 decode"], disagg_policy="always"))
    requests = shared_prefix_requests()
    sim.run(requests)
    sim.now_s += 60.0  # speculative entries have expired: only the workers' own events count
    router, placer = sim.router, sim.router.placer
    assert placer.cost_params.kv_bytes_per_token == KV_BYTES
    probe = [*requests[-1].prompt_token_ids[:512], *tokens(999, 40)]
    hashes = hash_blocks(probe, BS, (len(probe) - 1) // BS)
    truth = {}
    for wid, w in sim.by_id.items():
        held = {h for h, _ in w.block_manager.cached_blocks()}
        truth[wid] = next((i for i, h in enumerate(hashes) if h not in held), len(hashes))
    assert placer.index.match(hashes, list(sim.by_id)) == truth
    # from the events alone: no batch was lost, no snapshot but the registration's
    assert placer.index.num_resyncs == 0
    assert all(w.kv_events.num_snapshots == 1 and w.kv_events.num_batches > 0 for w in sim.by_id.values())
    # the prefill worker that computed the document holds it, and D, which received its KV
    assert sorted(truth.values()) == [0, 0, 32, 32] and truth["decode-0"] == 32, truth
    prefill = router.registry.by_role(Role.PREFILL)
    local = router.registry.by_role(Role.DECODE)
    # rates learned from the heartbeats' counters (a 1 GB/s link never outlasts the compute here:
    # these hand-offs teach no link rate, see test_a_slow_link_is_learned_from_transfers_…)
    assert all(info.perf.prefill_rate_tps is not None for info in prefill)
    assert local[0].perf.decode_step_s is not None and local[0].perf.link_bytes_per_s is None
    peers = placer._peer_means()
    assert peers.prefill_rate_tps == sum(i.perf.prefill_rate_tps or 0 for i in prefill) / len(prefill)
    for policy in ("auto", "always"):
        sim.now_s += 60.0  # the previous probe's speculative entries expire too
        placer.config = replace(placer.config, disagg_policy=policy)
        expected = cm.plan(len(probe), 8, truth, BS, [placer._snapshot(w, peers) for w in prefill],
                           [placer._snapshot(w, peers) for w in local], placer.cost_params,
                           random.Random(5), policy)
        placer.rng = random.Random(5)
        got = placer.place(probe, 8, prefill, local)
        assert got == expected
        assert got is not None and (got.prefill_id or got.decode_id) in [w for w, n in truth.items() if n]
