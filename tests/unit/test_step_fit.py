"""Prefill time as per-step + per-token costs (``pdserve.router.step_fit``) and its use in routing."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pdserve.block_hash import HASH_SCHEME
from pdserve.config import Role
from pdserve.router import cost_model as cm
from pdserve.router.dispatch_config import DispatcherConfig
from pdserve.router.placement import Placer
from pdserve.router.registry import Registry, WorkerInfo
from pdserve.router.step_fit import StepFit
from pdserve.worker import protocol as p

STEP_S, TOKEN_S = 0.020, 0.0005  # bench-50m on one thread here: ~20 ms a step, ~2,000 tokens/s after it


def busy(steps: int, tokens: int) -> float:
    return STEP_S * steps + TOKEN_S * tokens


def test_the_fit_recovers_both_costs_from_intervals_of_different_prompts() -> None:
    fit = StepFit()
    for steps, tokens in [(1, 400), (1, 48), (2, 100), (1, 400), (3, 150)]:
        fit.add(steps, tokens, busy(steps, tokens))
    solved = fit.solve()
    assert solved is not None
    assert solved[0] == pytest.approx(STEP_S) and solved[1] == pytest.approx(TOKEN_S)


def test_no_fit_while_every_interval_has_the_same_tokens_per_step() -> None:
    fit = StepFit()
    for _ in range(10):
        fit.add(1, 48, busy(1, 48))
        fit.add(2, 96, busy(2, 96))
    assert fit.solve() is None  # 48 tokens a step throughout: the two costs cannot be told apart
    few = StepFit()
    few.add(1, 400, busy(1, 400))
    few.add(1, 48, busy(1, 48))
    assert few.solve() is None  # too few samples
    merged = StepFit.merged([fit, few]).solve()  # a pool: one worker's variety serves the others
    assert merged is not None and merged == pytest.approx((STEP_S, TOKEN_S))


def test_a_negative_step_cost_from_noise_is_read_as_zero() -> None:
    fit = StepFit()
    for steps, tokens, t in [(1, 100, 0.049), (1, 200, 0.101), (1, 400, 0.2), (1, 50, 0.0248)]:
        fit.add(steps, tokens, t)
    solved = fit.solve()
    assert solved is not None and solved[0] == 0.0 and solved[1] == pytest.approx(0.0005, rel=0.02)


def test_the_cost_model_prices_a_prompt_with_the_fit() -> None:
    w = cm.WorkerSnapshot("p0", "prefill", queued_prefill_tokens=100, prefill_rate_tps=1000.0)
    params = cm.CostParams()
    assert cm.prefill_s(w, 400, params) == pytest.approx(0.5)  # no fit: tokens over the rate
    fitted = cm.WorkerSnapshot("p0", "prefill", queued_prefill_tokens=100, prefill_rate_tps=1000.0,
                               prefill_step_s=STEP_S, prefill_token_s=TOKEN_S)
    assert cm.prefill_s(fitted, 400, params) == pytest.approx(STEP_S + 500 * TOKEN_S)


def three_prefill_one_decode() -> tuple[Placer, Registry]:
    """A kv_aware placer (``always``) over prefill workers p0-p2 and decode worker d0, caches empty."""
    registry = Registry()
    config = DispatcherConfig(policy="kv_aware", disagg_policy="always")
    placer = Placer(config, registry, lambda wid, m: None, rng=random.Random(0))
    for wid, role in (("p0", Role.PREFILL), ("p1", Role.PREFILL), ("p2", Role.PREFILL), ("d0", Role.DECODE)):
        m = p.Register(wid, role.value, "tiny", 1, "h", 4096, 16, 10_000, hash_scheme=HASH_SCHEME, kv_epoch=1)
        assert placer.on_register(m) is None
        registry.add(WorkerInfo.from_register(m))
        placer.on_snapshot(p.KVSnapshot(wid, 1, 0, []))
    return placer, registry


def placer_with_history(noisy_p2: bool = False) -> tuple[Placer, Registry]:
    """Three equal prefill workers: p0 computed documents and follow-ups, p1 only follow-ups, p2 nothing
    (or, ``noisy_p2``, a few prompts whose steps happened to take 40 % longer)."""
    placer, registry = three_prefill_one_decode()
    history = {"p0": [(1, 400), (1, 48), (1, 400), (1, 64), (1, 400), (1, 48)], "p1": [(1, 48)] * 6}
    if noisy_p2:
        history["p2"] = [(1, 400), (1, 48), (1, 200), (1, 64)]
    for wid, intervals in history.items():
        slow = 1.4 if wid == "p2" else 1.0
        steps = tokens = 0
        total = 0.0
        registry.heartbeat(wid, p.WorkerLoad())
        for s, n in intervals:
            steps, tokens, total = steps + s, tokens + n, total + slow * busy(s, n)
            registry.heartbeat(
                wid, p.WorkerLoad(num_prefill_tokens=tokens, prefill_busy_s=total, num_prefill_steps=steps)
            )
    return placer, registry


@pytest.mark.parametrize("noisy_p2", [False, True])
def test_the_worker_that_computed_the_documents_does_not_look_faster_than_its_equals(noisy_p2: bool) -> None:
    """Nor does a worker whose few samples were slow look slower (it would never be measured again)."""
    placer, registry = placer_with_history(noisy_p2)
    if noisy_p2:
        own = registry.get("p2").perf.prefill_fit.solve()  # type: ignore[union-attr]
        assert own is not None and own[1] > 1.3 * TOKEN_S  # priced alone, p2 would lose every document
    rates = {w: registry.get(w).perf.prefill_rate_tps for w in ("p0", "p1")}  # type: ignore[union-attr]
    assert rates["p0"] > 1.25 * rates["p1"]  # tokens/s alone: p0 looks faster (the S6 feedback)
    prefill, decode = registry.by_role(Role.PREFILL), registry.by_role(Role.DECODE)
    chosen: Counter[str] = Counter()
    for doc in range(12):  # new documents, nothing cached anywhere; each done before the next comes
        tokens = [10_000 * (doc + 1) + i for i in range(400)]
        placement = placer.place(tokens, 8, prefill, decode)
        assert placement is not None and placement.prefill_id is not None
        chosen[placement.prefill_id] += 1
    assert set(chosen) == {"p0", "p1", "p2"} and max(chosen.values()) <= 5, chosen


def test_before_the_pool_fit_is_solvable_equal_workers_are_priced_alike() -> None:
    """The first seconds of a run: every prompt so far was a new document's (one step, ~430 tokens each),
    so no fit can be solved; the workers' own tokens/s differ by warm-up and luck. New documents must
    still spread over the pool (in S6 four of six went to one of three prefill workers)."""
    placer, registry = three_prefill_one_decode()
    # p0's one document took 40 % longer than p1's (its first step warmed up); p2 computed nothing yet
    for wid, busy_s in (("p0", 1.4 * busy(1, 430)), ("p1", busy(1, 430))):
        registry.heartbeat(wid, p.WorkerLoad())
        load = p.WorkerLoad(num_prefill_tokens=430, prefill_busy_s=busy_s, num_prefill_steps=1)
        registry.heartbeat(wid, load)
    perfs = {w: registry.get(w).perf for w in ("p0", "p1")}
    assert all(f.prefill_fit.solve() is None for f in perfs.values())  # one sample each: no fit
    assert perfs["p1"].prefill_rate_tps > 1.3 * perfs["p0"].prefill_rate_tps  # type: ignore[operator]
    prefill, decode = registry.by_role(Role.PREFILL), registry.by_role(Role.DECODE)
    chosen: Counter[str] = Counter()
    for doc in range(6):  # new documents, each done before the next comes
        tokens = [10_000 * (doc + 1) + i for i in range(430)]
        placement = placer.place(tokens, 8, prefill, decode)
        assert placement is not None and placement.prefill_id is not None
        chosen[placement.prefill_id] += 1
    assert set(chosen) == {"p0", "p1", "p2"} and max(chosen.values()) <= 3, chosen
