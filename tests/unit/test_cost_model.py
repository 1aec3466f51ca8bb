"""The cost model's choices on hand-built loads."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest

from pdserve.router import cost_model as cm

BS = 16
PARAMS = cm.CostParams(prefill_rate_tps=1000.0, kv_bytes_per_token=1000, link_bytes_per_s=1e8)


def p(wid: str, queued: int = 0, rate: float | None = 1000.0) -> cm.WorkerSnapshot:
    return cm.WorkerSnapshot(wid, "prefill", queued_prefill_tokens=queued, prefill_rate_tps=rate)


def d(wid: str, running: int = 0, usage: float = 0.0, role: str = "decode") -> cm.WorkerSnapshot:
    return cm.WorkerSnapshot(wid, role, num_running=running, kv_usage=usage, prefill_rate_tps=1000.0)


def plan(
    cached: dict[str, int],
    prefill: list,
    local: list,
    num_tokens: int = 1024,
    policy: str = "always",
    seed: int = 0,
) -> cm.Placement:  # type: ignore[type-arg]
    placement = cm.plan(num_tokens, 16, cached, BS, prefill, local, PARAMS, random.Random(seed), policy)
    assert placement is not None
    return placement


def test_cached_worker_wins_until_its_queue_is_long_enough_to_lose() -> None:
    cached = {"p0": 60}  # p0 holds 960 of the 1024 tokens
    assert plan(cached, [p("p0"), p("p1"), p("p2")], [d("d")]).prefill_id == "p0"
    # 64 uncached tokens + a queue of 800 still beat computing 1024 from scratch...
    assert plan(cached, [p("p0", queued=800), p("p1"), p("p2")], [d("d")]).prefill_id == "p0"
    # ...but not a queue of 2000 (about 2 s against 1 s).
    loser = plan(cached, [p("p0", queued=2000), p("p1"), p("p2")], [d("d")])
    assert loser.prefill_id in ("p1", "p2") and loser.num_cached_tokens == 0


def test_faster_worker_wins_when_nothing_is_cached() -> None:
    assert plan({}, [p("slow", rate=500.0), p("fast", rate=4000.0)], [d("d")]).prefill_id == "fast"


def test_ties_spread_over_workers() -> None:
    rng = random.Random(1)
    counts: Counter[str] = Counter()
    prefill = [p(f"p{i}") for i in range(3)]
    for _ in range(300):
        placement = cm.plan(512, 16, {}, BS, prefill, [d("d")], PARAMS, rng, "always")
        assert placement is not None and placement.prefill_id is not None
        counts[placement.prefill_id] += 1
    assert set(counts) == {"p0", "p1", "p2"}
    assert max(counts.values()) < 2 * min(counts.values())


def test_decode_choice_by_predicted_itl_and_kv_pressure() -> None:
    prefill = [p("p0")]
    assert plan({}, prefill, [d("busy", running=30), d("idle")]).decode_id == "idle"
    assert plan({}, prefill, [d("full", usage=0.99), d("roomy", running=2, usage=0.3)]).decode_id == "roomy"


def test_decode_worker_holding_the_conversation_moves_less() -> None:
    placement = plan({"d1": 50}, [p("p0")], [d("d0"), d("d1")], num_tokens=1000)
    assert placement.decode_id == "d1" and placement.num_moved_tokens == 1000 - 800


def test_auto_prefills_short_prompts_locally() -> None:
    placement = plan({}, [p("p0")], [d("d", running=0)], num_tokens=12, policy="auto")
    assert placement.prefill_id is None and placement.reason == cm.LOCAL_SHORT
    assert placement.num_moved_tokens == 0


def test_auto_sends_long_prompts_to_prefill_when_decode_is_busy() -> None:
    placement = plan({}, [p("p0")], [d("d", running=16)], num_tokens=2000, policy="auto")
    assert placement.prefill_id == "p0" and placement.reason == cm.REMOTE


def test_auto_prefills_mostly_cached_prompts_on_decode() -> None:
    placement = plan({"d": 120, "p0": 0}, [p("p0")], [d("d", running=16)], num_tokens=2000, policy="auto")
    assert placement.prefill_id is None and placement.reason == cm.LOCAL_CACHED


def test_auto_goes_local_when_the_prefill_pool_is_saturated() -> None:
    placement = plan({}, [p("p0", queued=20000)], [d("d", running=1)], num_tokens=800, policy="auto")
    assert placement.prefill_id is None and placement.reason == cm.LOCAL_BUSY


def test_forced_policies_and_fallbacks() -> None:
    assert plan({}, [p("p0")], [d("d")], num_tokens=8, policy="always").reason == cm.FORCED_REMOTE
    never = plan({}, [p("p0")], [d("d")], num_tokens=4000, policy="never")
    assert never.prefill_id is None and never.reason == cm.FORCED_LOCAL
    assert plan({}, [], [d("d")], policy="always").reason == cm.NO_PREFILL
    agg = plan({}, [], [d("m", role="mixed")], policy="auto")
    assert agg.decode_id == "m" and agg.reason == cm.AGGREGATED
    assert cm.plan(8, 1, {}, BS, [p("p0")], [], PARAMS, random.Random(), "auto") is None
    with pytest.raises(ValueError, match="always"):
        cm.plan(8, 1, {}, BS, [], [d("d")], PARAMS, random.Random(), "sometimes")


def test_terms_are_in_seconds() -> None:
    w = p("p", queued=500)
    assert cm.prefill_s(w, 500, PARAMS) == pytest.approx(1.0)
    assert cm.transfer_s(1000, 1e8, PARAMS) == pytest.approx(PARAMS.handoff_s + 0.01)
    assert cm.itl_s(
        cm.WorkerSnapshot("d", "decode", decode_step_s=0.01, decode_batch=4, num_running=7), PARAMS
    ) == (pytest.approx(0.02))


def test_a_decoding_worker_does_not_take_a_chat_prompt_from_an_idle_prefill_worker() -> None:
    """S3's 1P+1D chat: D decodes a few streams and P is idle. Computing a 200-token prompt on D
    stalls every stream of its batch as long as the prompt takes: P computes it (with a 0.25
    interference weight D took 60 % of the prompts and goodput fell below ``always``'s)."""
    for running in (1, 3, 8):
        placement = plan({}, [p("p0")], [d("d", running=running)], num_tokens=200, policy="auto")
        assert placement.prefill_id == "p0" and placement.reason == cm.REMOTE, running
    assert plan({}, [p("p0")], [d("d", running=0)], num_tokens=200, policy="auto").prefill_id is None


def test_a_new_prefix_goes_to_the_emptiest_cache_among_near_ties() -> None:
    """Nobody holds the prompt: the tie goes to the worker whose cache holds the fewest blocks, so
    prefixes' homes spread instead of landing where the random draw put them."""
    prefill = [replace(p(f"p{i}"), held_blocks=held) for i, held in enumerate((300, 40, 500))]
    for seed in range(20):
        assert plan({}, prefill, [d("d")], seed=seed).prefill_id == "p1"


def test_near_ties_go_to_the_worker_with_fewer_requests_in_flight_first() -> None:
    busy = replace(p("busy", rate=1050.0), num_inflight=2)  # a little faster, but busier
    idle = replace(p("idle"), num_inflight=0, held_blocks=900)
    for seed in range(20):
        assert plan({}, [busy, idle], [d("d")], seed=seed).prefill_id == "idle"


def test_rate_noise_is_a_tie_but_a_real_speed_gap_is_not() -> None:
    """Equal workers measure prefill rates ~10 % apart: still a tie (the emptier cache wins); a worker
    twice as fast wins whatever its cache holds."""
    noisy = [replace(p("p0", rate=1100.0), held_blocks=500), replace(p("p1", rate=1000.0), held_blocks=0)]
    assert plan({}, noisy, [d("d")]).prefill_id == "p1"
    fast = [replace(p("p0", rate=2000.0), held_blocks=500), replace(p("p1", rate=1000.0), held_blocks=0)]
    assert plan({}, fast, [d("d")]).prefill_id == "p0"
