"""The planner on signals recorded from the simulated S7 runs (data/s7_planner_chat_snapshots.json):
the chat phase it left 2M for 1P+1D on, and the classic load's lull it scaled down to 1M and straight
back up on; and the two models behind the fixes (a request's TPOT distribution, a load's onset)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pdserve.planner import planner as pl
from pdserve.planner.predict import Speeds
from pdserve.planner.signals import RequestSample, Shape, Signals, WorkerSignal
from pdserve.planner.tpot import batch_distribution, tpot_attainment

DATA = Path(__file__).parent / "data" / "s7_planner_chat_snapshots.json"


def _snapshots() -> dict[str, Any]:
    return json.loads(DATA.read_text())["snapshots"]


def signals_of(s: dict[str, Any]) -> Signals:
    """A :class:`Signals` from its recorded ``dataclasses.asdict``."""
    return Signals(
        **{
            **s,
            "requests": tuple(RequestSample(**r) for r in s["requests"]),
            "inflight": tuple(RequestSample(**r) for r in s["inflight"]),
            "workers": tuple(WorkerSignal(**w) for w in s["workers"]),
            "targets": Shape(**s["targets"]),
            "actual": Shape(**s["actual"]),
            "starting": tuple(s["starting"]),
            "failed": tuple(s["failed"]),
        }
    )


def recorded(at: str) -> tuple[Signals, pl.PlannerState, pl.PlannerConfig]:
    """One decision's inputs: the signals and the planner's state just before it decided."""
    snap = _snapshots()[at]
    state = pl.PlannerState(speeds=Speeds(**snap["previous_speeds"]) if snap["previous_speeds"] else None)
    state.arrivals.extend(snap["arrivals"])
    state.down_streak = snap["down_streak"]
    state.down_candidate = Shape(**snap["down_candidate"]) if snap["down_candidate"] else None
    state.left = {Shape(**k): (v[0], v[1], v[2]) for k, v in snap["left"]}
    return signals_of(snap["signals"]), state, pl.PlannerConfig(**snap["config"])


def test_recorded_chat_phase_keeps_two_mixed_workers() -> None:
    """S7 surge, 20 s into chat: the planner left 2M for 1P+1D (measured: agg2 0.639 req/s of
    goodput on that phase, 1P+1D 0.389). It read 0.6 req/s for a 0.9 req/s stream that had run
    for 20 s of its 30 s window, and judged 1P+1D's TPOT by its mean alone."""
    _, state, config = recorded("surge/10.0")
    sig10 = signals_of(_snapshots()["surge/10.0"]["signals"])
    pl.decide(sig10, state, config)
    sig, _, _ = recorded("surge/20.0")
    assert _snapshots()["surge/20.0"]["decision_then"]["shape"] == "1P+1D"
    assert sig.arrival_rate == pytest.approx(18 / 20 / (1 + 1 / 18) * 1, rel=0.15)
    d = pl.decide(sig, state, config)
    assert d.target == Shape(mixed=2), d.reason
    by_shape = {c.shape: c for c in d.candidates}
    split, mixed = by_shape[Shape(prefill=1, decode=1)], by_shape[Shape(mixed=2)]
    assert split.attainment < mixed.attainment
    assert split.itl_attainment < 0.5  # its one decoder at ~0.9 req/s of chat


def test_recorded_classic_lull_does_not_scale_down() -> None:
    """S7 classic, third phase (chat at 1 req/s): 30 s windows read 0.67-0.8 req/s for a minute;
    the N−1 check passed at 1.1 × that peak, 1M was taken at 450 s and left at 470 s."""
    sig, state, config = recorded("classic/420.0")
    actions = [pl.decide(sig, state, config).action]
    for at in ("classic/430.0", "classic/440.0", "classic/450.0"):
        actions.append(pl.decide(signals_of(_snapshots()[at]["signals"]), state, config).action)
    assert _snapshots()["classic/450.0"]["decision_then"]["action"] == pl.SCALE_DOWN
    assert pl.SCALE_DOWN not in actions, actions


def test_the_rate_bound_covers_a_lull() -> None:
    sig, _, _ = recorded("classic/450.0")
    assert sig.arrival_rate < 0.85  # the lull: the stream runs at 1 req/s
    assert sig.arrival_rate_bound() > 1.0
    empty = Signals(taken_s=0.0, window_s=30.0, requests=(), workers=(), targets=Shape(mixed=1),
                    actual=Shape(mixed=1))
    assert empty.arrival_rate == 0.0 and 0 < empty.arrival_rate_bound() < 0.2


def _at(times: list[float], now: float = 100.0, window: float = 30.0) -> Signals:
    reqs = tuple(RequestSample(t, 100, 10, 0.1, 0.02, 0.1, 0.0, 0.3, True) for t in times)
    return Signals(taken_s=now, window_s=window, requests=reqs, workers=(), targets=Shape(mixed=1),
                   actual=Shape(mixed=1))


def test_a_load_that_started_inside_the_window_is_read_at_its_rate() -> None:
    steady = _at([70.5 + i for i in range(30)])  # 1 req/s through the window
    assert steady.arrival_rate == pytest.approx(1.0)
    onset = _at([80.5 + i for i in range(20)])  # 1 req/s for the last 20 s only
    assert onset.arrival_rate == pytest.approx(1.0, rel=0.1)
    stopped = _at([70.5 + i for i in range(10)])  # 1 req/s for 10 s, then nothing: 1/3 req/s
    assert stopped.arrival_rate == pytest.approx(1 / 3)
    few = _at([95.0, 96.0])  # too few to tell a start from a lull
    assert few.arrival_rate == pytest.approx(2 / 30)


def test_tpot_attainment_sees_the_batch_fluctuate() -> None:
    outputs = [20, 50, 100, 100, 200, 300]
    base, slope, limit = 0.01, 0.006, 0.04
    mean = sum(outputs) / len(outputs)
    # at low load every request is within; near saturation many are although the mean batch
    # step (the old single-number prediction) is within the SLO
    assert tpot_attainment(0.05, outputs, base, slope, limit) > 0.99
    lam = 0.75 / (mean * slope)  # ρ = 0.75
    pi = batch_distribution(lam, mean, base, slope)
    assert pi is not None and sum(pi) == pytest.approx(1.0)
    share = tpot_attainment(lam, outputs, base, slope, limit)
    assert 0.05 < share < 0.9
    assert tpot_attainment(lam * 0.8, outputs, base, slope, limit) > share  # monotone in the load
    assert tpot_attainment(1 / (mean * slope), outputs, base, slope, limit) == 0.0  # saturated
    # one-token requests have no gap; a prefill stretch makes every step longer
    assert tpot_attainment(lam, [1, 1], base, slope, limit) == 1.0
    assert tpot_attainment(lam * 0.5, outputs, base, slope, limit, stretch=1.3) < tpot_attainment(
        lam * 0.5, outputs, base, slope, limit
    )
