"""The planner's decision function on recorded-shape signal snapshots (no processes)."""

from __future__ import annotations

import json
import math
import random

import pytest

from pdserve.planner import planner as pl
from pdserve.planner.signals import Shape, Signals, parse

NOW = 1_000_000.0
WINDOW = 20.0


def trace(
    arrived: float,
    prompt: int,
    output: int,
    *,
    prefill_tps: float = 1000.0,
    itl: float = 0.02,
    queue: float = 0.0,
    outcome: str = "finished",
) -> dict:
    """One ``/pdserve/traces`` entry as the router writes it."""
    prefill = prompt / prefill_tps
    ttft = 0.002 + queue + prefill
    return {
        "request_id": f"r{arrived}",
        "arrived_unix_s": arrived,
        "outcome": outcome,
        "attempts": 1,
        "num_prompt_tokens": prompt,
        "num_tokens": output,
        "ttft_s": ttft,
        "ttft_breakdown": {
            "ttft_s": ttft,
            "queue_s": queue,
            "prefill_s": prefill,
            "transfer_s": 0.0,
            "delivery_s": 0.001,
            "router_queue_s": 0.001,
            "worker_queue_s": queue,
            "network_s": 0.0,
            "router_delivery_s": 0.001,
            "exact": True,
        },
        "last_token_s": ttft + itl * (output - 1),
        "e2e_s": ttft + itl * (output - 1),
    }


def view(targets: Shape, actual: Shape | None = None, slots: list[dict] | None = None) -> dict:
    """A ``/pdserve/workers?stats=false`` answer."""
    actual = actual or targets
    workers = [
        {"worker_id": f"{role}-{i}", "role": role, "draining": False}
        for role in ("prefill", "decode", "mixed")
        for i in range(getattr(actual, role))
    ]
    pools = {
        r: {"target": getattr(targets, r), "actual": getattr(actual, r), "states": {}}
        for r in ("prefill", "decode", "mixed")
    }
    return {"workers": workers, "deployment": {"supervised": True, "pools": pools, "workers": slots or []}}


def snapshot(
    rate: float,
    prompt: int,
    output: int,
    shape: Shape,
    *,
    now: float = NOW,
    actual: Shape | None = None,
    slots: list[dict] | None = None,
    seed: int = 0,
    **kw: float,
) -> Signals:
    """Poisson arrivals at ``rate`` over the window, lengths spread ±50% around the given ones."""
    rng = random.Random(seed)
    traces, t = [], now - WINDOW
    while rate > 0:
        t += rng.expovariate(rate)
        if t >= now:
            break
        traces.append(
            trace(
                t,
                max(1, int(prompt * rng.uniform(0.5, 1.5))),
                max(2, int(output * rng.uniform(0.5, 1.5))),
                **kw,
            )
        )
    return parse(traces, view(shape, actual, slots), "", now_s=now, window_s=WINDOW)


def cfg(**kw: float) -> pl.PlannerConfig:
    base = {
        "ttft_slo_s": 1.5,
        "itl_slo_s": 0.05,
        "max_workers": 2,
        "down_intervals": 3,
        "ready_timeout_s": 30.0,
    }
    return pl.PlannerConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_parse_reads_rates_lengths_and_attainment() -> None:
    sig = snapshot(5.0, 100, 20, Shape(mixed=1))
    assert sig.arrival_rate == pytest.approx(len(sig.requests) / WINDOW)
    assert min(sig.prompt_lengths) >= 50 and max(sig.prompt_lengths) <= 150
    assert sig.attainment(0.5, 0.05) == 1.0
    assert sig.attainment(0.05, 0.05) is not None and sig.attainment(0.05, 0.05) < 1.0
    assert sig.targets == Shape(mixed=1) and sig.actual == Shape(mixed=1)


def test_scale_up_when_ttft_misses() -> None:
    # 1000 tokens/s of prefill per worker; 1.6 req/s of ~500-token prompts: one worker is 80% busy.
    state = pl.PlannerState()
    d = pl.decide(snapshot(1.6, 500, 20, Shape(mixed=1)), state, cfg())
    assert d.action == pl.SCALE_UP
    assert d.target.workers == 2 and d.target.servable
    assert d.chosen is not None and d.chosen.meets
    assert state.pending == d.target


def test_long_prompts_under_a_tight_itl_stay_disaggregated() -> None:
    # Prefill steals a mixed worker's time and stretches every decode step; a decode pool does not
    # (ITLs measured on 1P+1D: 2M's would be stretched past the SLO).
    d = pl.decide(
        snapshot(1.0, 600, 60, Shape(prefill=1, decode=1)),
        pl.PlannerState(),
        cfg(itl_slo_s=0.025, ttft_slo_s=2.0),
    )
    assert d.target == Shape(prefill=1, decode=1), d.reason
    two = next(c for c in d.candidates if c.shape == Shape(mixed=2))
    assert two.itl_s > 0.025 and two.itl_attainment < 0.5


def test_short_prompts_stay_aggregated_at_the_floor() -> None:
    d = pl.decide(snapshot(0.5, 20, 30, Shape(mixed=1)), pl.PlannerState(), cfg())
    assert d.action == pl.HOLD and d.target == Shape(mixed=1)


def test_scale_down_waits_for_several_intervals() -> None:
    state, c = pl.PlannerState(), cfg()
    actions = [
        pl.decide(snapshot(0.3, 50, 20, Shape(mixed=2), now=NOW + i), state, c).action for i in range(3)
    ]
    assert actions == [pl.HOLD, pl.HOLD, pl.SCALE_DOWN]
    assert state.pending == Shape(mixed=1)


def test_absorb_check_vetoes_removal_after_a_recent_peak() -> None:
    state, c = pl.PlannerState(), cfg(down_intervals=1)
    pl.decide(snapshot(1.6, 500, 20, Shape(mixed=2)), state, c)  # a busy interval: the peak
    state.pending = None
    d = pl.decide(snapshot(0.3, 500, 20, Shape(mixed=2), now=NOW + 5), state, c)
    assert d.action == pl.HOLD and d.target == Shape(mixed=2)
    assert "absorb" in d.reason


def test_zero_traffic_goes_to_the_floor_without_nan() -> None:
    state, c = pl.PlannerState(), cfg(max_workers=3, down_intervals=2)
    decisions = [
        pl.decide(snapshot(0.0, 0, 0, Shape(prefill=1, decode=2), now=NOW + i), state, c) for i in range(2)
    ]
    assert decisions[-1].action == pl.SCALE_DOWN and decisions[-1].target == Shape(mixed=1)
    for d in decisions:
        text = json.dumps(d.as_dict(), allow_nan=False)  # raises on NaN/inf
        assert "NaN" not in text
    assert all(math.isfinite(v) for v in decisions[-1].inputs.values() if isinstance(v, float))


def test_a_worker_that_never_becomes_ready_is_given_up() -> None:
    state, c = pl.PlannerState(), cfg()
    up = pl.decide(snapshot(1.6, 500, 20, Shape(mixed=1)), state, c)
    assert up.action == pl.SCALE_UP
    slots = [{"worker_id": "mixed-1", "state": "starting"}]
    waiting = pl.decide(
        snapshot(1.6, 500, 20, up.target, actual=Shape(mixed=1), slots=slots, now=NOW + 10), state, c
    )
    assert waiting.action == pl.WAIT and not waiting.changes
    late = pl.decide(
        snapshot(1.6, 500, 20, up.target, actual=Shape(mixed=1), slots=slots, now=NOW + 31), state, c
    )
    assert late.action == pl.GIVE_UP
    assert late.given_up == ("mixed-1",)
    assert late.target == Shape(mixed=1)  # back to what is ready
    assert state.pending is None


def test_reached_target_clears_pending() -> None:
    state, c = pl.PlannerState(), cfg()
    up = pl.decide(snapshot(1.6, 500, 20, Shape(mixed=1)), state, c)
    d = pl.decide(snapshot(1.6, 500, 20, up.target, now=NOW + 5), state, c)
    assert d.action != pl.WAIT and state.pending is None


@pytest.mark.parametrize("budget", [1, 2, 3])
def test_budget_is_respected_even_past_capacity(budget: int) -> None:
    d = pl.decide(snapshot(20.0, 800, 50, Shape(mixed=1)), pl.PlannerState(), cfg(max_workers=budget))
    assert d.target.workers <= budget and d.target.servable
    assert d.over_capacity
    assert all(p.shape.workers <= budget for p in d.candidates)


def test_p_and_d_change_in_one_decision() -> None:
    # long prompts saturate 1P+1D's one prefill worker; two mixed workers prefill them both
    d = pl.decide(snapshot(1.0, 1000, 60, Shape(prefill=1, decode=1)), pl.PlannerState(), cfg(ttft_slo_s=2.0))
    body = d.target.targets()
    assert set(body) == {"prefill", "decode", "mixed"}  # every pool in the one scale call
    assert body == {"prefill": 0, "decode": 0, "mixed": 2}, d.reason


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        pl.PlannerConfig(ttft_slo_s=0, itl_slo_s=0.05)
    with pytest.raises(ValueError):
        pl.PlannerConfig(ttft_slo_s=1, itl_slo_s=0.05, min_workers=3, max_workers=2)


def test_a_cut_trace_buffer_does_not_understate_the_arrival_rate() -> None:
    # 300 traces over the last 5 s of a 30 s window: the router kept only its newest ones
    traces = [trace(NOW - 5 + i / 60, 50, 10) for i in range(300)]
    sig = parse(traces, view(Shape(mixed=1)), "", now_s=NOW, window_s=30.0)
    assert sig.arrival_rate == pytest.approx(60.0, rel=0.05)
    spread = [trace(NOW - 29.5 + 1.5 * i, 50, 10) for i in range(20)]
    few = parse(spread, view(Shape(mixed=1)), "", now_s=NOW, window_s=30.0)
    assert few.arrival_rate == pytest.approx(20 / 30.0)  # a short list is the whole window


def inflight(arrived: float, prompt: int, ttft: float | None = None) -> dict:
    """A ``/pdserve/traces?inflight=true`` entry: no end yet (a first token or not)."""
    return {"request_id": f"f{arrived}", "arrived_unix_s": arrived, "outcome": None,
            "num_prompt_tokens": prompt, "num_tokens": 0 if ttft is None else 1, "ttft_s": ttft,
            "ttft_breakdown": None, "e2e_s": None}


def test_requests_in_flight_are_load_and_overdue_ones_are_misses() -> None:
    ended = [trace(NOW - 15 + i, 100, 20) for i in range(4)]  # fast, within the SLO
    waiting = [inflight(NOW - 10 + i, 800) for i in range(6)]  # no first token for 5-10 s
    sig = parse(ended, view(Shape(mixed=1)), "", now_s=NOW, window_s=WINDOW, inflight=waiting)
    assert len(sig.inflight) == 6 and sig.arrival_rate == pytest.approx(10 / WINDOW)
    assert sorted(sig.prompt_lengths)[-1] == 800 and set(sig.output_lengths) == {20}
    assert sig.attainment(1.5, 0.05) == pytest.approx(4 / 10)  # six overdue misses
    ttft90, _ = sig.measured_p90(1.5)
    assert ttft90 is not None and ttft90 >= 5.0  # their waits so far, a lower bound
    assert sig.attainment(20.0, 0.05) == 1.0  # not overdue yet under a looser SLO: not judged


def test_a_backlog_with_nothing_ended_is_not_taken_for_zero_traffic() -> None:
    """Long requests queued behind a full cache end nothing for a while: the planner must not
    scale down under them (it saw an arrival rate of 0 before it counted requests in flight)."""
    state, c = pl.PlannerState(), cfg(down_intervals=1)
    waiting = [inflight(NOW - 12 + 0.5 * i, 600) for i in range(20)]
    for i in range(3):
        sig = parse([], view(Shape(mixed=2)), "", now_s=NOW + i, window_s=WINDOW, inflight=waiting)
        d = pl.decide(sig, state, c)
        assert d.action != pl.SCALE_DOWN and d.target.workers == 2, d.reason
        assert d.inputs["arrival_rate"] > 0 and d.inputs["num_inflight"] == 20


def test_a_shape_left_is_not_gone_back_to_unless_the_current_one_measures_worse() -> None:
    """S3 saw 2M → 1P+1D → 2M → 1P+1D … every few intervals, each move predicted to meet the SLOs
    and measured not to. A shape left measuring ``a`` is gone back to, at a similar load, only while
    the current shape measures below ``a``."""
    c = cfg(ttft_slo_s=1.0)
    state = pl.PlannerState()
    state.left[Shape(prefill=1, decode=1)] = (NOW - 30, 0.5, 1.0)  # 1P+1D measured 50 % at 1 req/s
    good = [trace(NOW - 19 + i, 100, 20) for i in range(20)]  # 1 req/s, all within the SLOs
    bad = [trace(NOW - 19 + i, 100, 20, queue=2.0 if i % 2 else 0.0) for i in range(20)]  # 50 % miss
    worse = [trace(NOW - 19 + i, 100, 20, queue=2.0 if i % 4 else 0.0) for i in range(20)]  # 75 % miss

    def veto(traces: list[dict], now: float = NOW) -> str | None:
        sig = parse(traces, view(Shape(mixed=2)), "", now_s=now, window_s=WINDOW)
        return pl._revisit_veto(state, sig, c, Shape(prefill=1, decode=1))

    assert veto(good) is not None and "left 30 s ago measuring 50%" in str(veto(good))
    assert veto(bad) is not None  # 50 % now as then: no better reason to go back
    assert veto(worse) is None  # 25 %: worse than 1P+1D measured
    assert veto(good, now=NOW + c.revisit_s) is None  # long ago: try again
    busier = [trace(NOW - 19 + 0.5 * i, 100, 20) for i in range(40)]  # 2 req/s: another load
    assert veto(busier) is None
    assert pl._revisit_veto(state, parse(good, view(Shape(mixed=2)), "", now_s=NOW, window_s=WINDOW), c,
                            Shape(mixed=1)) is None  # never left


def test_acting_records_the_shape_left_with_its_measured_attainment() -> None:
    state, c = pl.PlannerState(), cfg()
    d = pl.decide(snapshot(1.6, 500, 20, Shape(mixed=1)), state, c)
    assert d.action == pl.SCALE_UP
    at_s, attainment, rate = state.left[Shape(mixed=1)]
    assert at_s == d.at_s and attainment == d.inputs["attainment"] and rate == d.inputs["arrival_rate"]
