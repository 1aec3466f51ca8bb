"""The planner choosing each worker's threads within a core budget (recorded snapshots, no processes)."""

from __future__ import annotations

import argparse
import random

import pytest
from test_planner import WINDOW, trace
from test_planner_options import serve_args as option_args

from pdserve.planner import options
from pdserve.planner import planner as pl
from pdserve.planner.predict import Speeds
from pdserve.planner.signals import Shape, Signals, parse
from pdserve.planner.stalls import ChunkFit
from pdserve.planner.thread_scaling import ThreadScaling, ThreadSpeed

NOW = 2_000_000.0
#: a compute-bound prefill twice as fast on two threads, a decode step 1.25x as fast
TABLE = ThreadScaling({1: ThreadSpeed(1000.0, 0.020, 0.002), 2: ThreadSpeed(2000.0, 0.016, 0.0016)})


def view(shape: Shape, threads: list[int], target_threads: int | None = None) -> dict:
    """``/pdserve/workers?stats=false`` with each registered worker's threads."""
    roles = [r for r in ("prefill", "decode", "mixed") for _ in range(getattr(shape, r))]
    workers = [{"worker_id": f"{r}-{i}", "role": r, "draining": False, "threads": t}
               for i, (r, t) in enumerate(zip(roles, threads, strict=True))]
    pools = {r: {"target": getattr(shape, r), "actual": getattr(shape, r), "states": {}}
             for r in ("prefill", "decode", "mixed")}
    return {"workers": workers,
            "deployment": {"supervised": True, "pools": pools, "workers": [], "threads": target_threads}}


def load(rate: float, prompt: int, output: int, shape: Shape, threads: list[int], prefill_tps: float,
         seed: int = 0) -> Signals:
    """Poisson arrivals over the window, served at ``prefill_tps`` (lengths ±20 %)."""
    rng = random.Random(seed)
    traces, t = [], NOW - WINDOW
    while True:
        t += rng.expovariate(rate)
        if t >= NOW:
            break
        traces.append(trace(t, int(prompt * rng.uniform(0.8, 1.2)), int(output * rng.uniform(0.8, 1.2)),
                            prefill_tps=prefill_tps, itl=0.02))
    return parse(traces, view(shape, threads), "", now_s=NOW, window_s=WINDOW)


def config(**kw: object) -> pl.PlannerConfig:
    base: dict[str, object] = {"ttft_slo_s": 1.5, "itl_slo_s": 0.05, "max_workers": 2, "max_cores": 2,
                               "thread_scaling": TABLE, "down_intervals": 3, "ready_timeout_s": 30.0}
    return pl.PlannerConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_scaling_a_speed_by_the_table() -> None:
    measured = Speeds(prefill_tps=900.0, step_s=0.03, per_seq_s=0.003, prefill_per_pair_s=1e-6, measured=True,
                      chunk_fit=ChunkFit(0.01, 1e-3, 1e-7))
    two = TABLE.scale(measured, 1, 2)
    assert two.prefill_tps == pytest.approx(1800.0)
    assert two.prefill_per_pair_s == pytest.approx(0.5e-6)
    assert two.step_s == pytest.approx(0.03 * 0.8) and two.per_seq_s == pytest.approx(0.003 * 0.8)
    assert two.chunk_fit is not None and two.chunk_fit.token_s == pytest.approx(0.5e-3)
    assert TABLE.scale(two, 2, 1).prefill_tps == pytest.approx(900.0)
    assert TABLE.scale(measured, 1, 4) is measured  # 4 threads were not measured: left as they are
    flat = ThreadScaling({1: ThreadSpeed(1000.0, 0.02, 0.0), 2: ThreadSpeed(1500.0, 0.01, 0.0)})
    assert flat.scale(measured, 1, 2).per_seq_s == pytest.approx(0.0015)  # no per-sequence cost: the step's


def test_the_table_round_trips_and_refuses_nonsense() -> None:
    assert ThreadScaling.from_dict(TABLE.as_dict()) == TABLE
    with pytest.raises(ValueError):
        ThreadScaling.from_dict({"1": {"prefill_tps": 100.0}})
    with pytest.raises(ValueError):
        ThreadScaling.from_dict({"0": {"prefill_tps": 100.0, "step_s": 0.01, "per_seq_s": 0.0}})


def test_candidates_cost_cores_within_the_budget() -> None:
    shapes = pl.candidates(config())
    assert set(shapes) == {Shape(mixed=1, threads=1), Shape(mixed=1, threads=2), Shape(mixed=2, threads=1),
                           Shape(prefill=1, decode=1, threads=1)}
    assert [s.cores for s in shapes] == sorted(s.cores for s in shapes)
    assert Shape(mixed=1, threads=2).targets() == {"prefill": 0, "decode": 0, "mixed": 1, "threads": 2}
    # without a table (or a core budget) the threads are not the planner's: the shapes carry none
    fixed = pl.candidates(config(thread_scaling=None))
    assert {s.threads for s in fixed} == {0} and "threads" not in fixed[0].targets()


def test_parse_reads_the_workers_threads() -> None:
    sig = parse([], view(Shape(mixed=2), [1, 1]), "", now_s=NOW, window_s=WINDOW)
    assert sig.actual == Shape(mixed=2, threads=1) and sig.targets == Shape(mixed=2, threads=1)
    moving = parse([], view(Shape(mixed=2), [1, 2], target_threads=2), "", now_s=NOW, window_s=WINDOW)
    assert moving.actual.threads == 0  # the counts differ: not in place yet
    assert moving.targets.threads == 2


def test_long_prompts_take_one_worker_with_two_threads() -> None:
    """2M×1t measures 1,000 prompt tokens/s: a 1,800-token prompt takes 1.8 s against a 1.5 s
    TTFT SLO. The table says two threads prefill twice as fast: 1M×2t (the same two cores) meets it."""
    sig = load(0.3, 1800, 20, Shape(mixed=2), [1, 1], prefill_tps=1000.0)
    d = pl.decide(sig, pl.PlannerState(), config())
    assert d.action == pl.RESHAPE and d.target == Shape(mixed=1, threads=2), d.reason
    assert d.target.targets()["threads"] == 2
    assert d.inputs["threads"] == 1
    # the same load, the threads not the planner's: no shape of two one-thread workers meets it
    fixed = pl.decide(sig, pl.PlannerState(), config(thread_scaling=None))
    assert "threads" not in fixed.target.targets() and fixed.target.threads == 0
    assert fixed.over_capacity


def test_speeds_carried_over_are_rebased_when_the_threads_change() -> None:
    state = pl.PlannerState()
    pl.decide(load(0.3, 300, 20, Shape(mixed=2), [1, 1], prefill_tps=1000.0), state, config())
    assert state.speeds_threads == 1
    assert state.speeds is not None and state.speeds.prefill_tps == pytest.approx(1000.0, rel=0.05)
    # an empty window at two threads: nothing new measured, the carried speeds are re-based
    pl.decide(parse([], view(Shape(mixed=1), [2]), "", now_s=NOW + 10, window_s=WINDOW), state, config())
    assert state.speeds_threads == 2
    assert state.speeds.prefill_tps == pytest.approx(2000.0, rel=0.05)


def test_two_one_thread_workers_keep_a_load_they_serve() -> None:
    """Equal cores, and the shape in place meets the SLOs: no reshape for a better prediction alone."""
    sig = load(0.5, 300, 20, Shape(mixed=2), [1, 1], prefill_tps=1000.0)
    d = pl.decide(sig, pl.PlannerState(), config())
    assert d.target.cores <= 2 and d.action != pl.RESHAPE, d.reason


def test_workers_threads_ignored_when_the_planner_does_not_choose_them() -> None:
    """Workers started with two threads under a worker budget: their shapes carry no threads, so the
    shape in place is the candidate of the same pools (no reshape loop on a thread count)."""
    sig = load(0.5, 300, 20, Shape(mixed=2), [2, 2], prefill_tps=2000.0)
    d = pl.decide(sig, pl.PlannerState(), config(max_cores=None, thread_scaling=None))
    assert d.current == Shape(mixed=2) and d.action == pl.HOLD, d.reason


def serve_args(*argv: str) -> argparse.Namespace:
    """``serve``'s options of a planner started as 2M (test_planner_options' parser)."""
    return option_args("--mixed", "2", "--planner", "slo", "--ttft-ms", "500", "--itl-ms", "40", *argv)


def test_a_core_budget_without_fixed_threads_lets_the_planner_choose() -> None:
    args = serve_args("--max-cores", "2")
    assert options.chooses_threads(args)
    assert options.start_threads(args, 2) == 1 and options.start_threads(args, 1) == 2
    assert options.thread_counts(args)[0] == 1
    assert options.thread_counts(serve_args("--max-cores", "1")) == []  # one count: nothing to choose
    cfg = options.planner_config(args, TABLE)
    assert cfg.max_cores == 2 and cfg.thread_options == (1, 2)
    fixed = serve_args("--max-cores", "2", "--threads-per-worker", "1")
    assert not options.chooses_threads(fixed) and options.thread_counts(fixed) == []
    assert options.planner_config(fixed, TABLE).thread_options == ()
    assert options.planner_config(serve_args("--max-workers", "2"), TABLE).thread_options == ()


def test_a_scale_up_between_equally_attaining_shapes_takes_the_most_headroom() -> None:
    """1M×1t misses; 2M×1t and 1M×2t (two cores each) are both predicted at 100 %: the one of the
    lower TTFT p90 against its SLO wins (before, whichever was listed first: 2M×1t)."""
    sig = load(1.0, 500, 20, Shape(mixed=1), [1], prefill_tps=1000.0)
    d = pl.decide(sig, pl.PlannerState(), config(ttft_slo_s=0.8))
    meeting = {str(c.shape): c for c in d.candidates if c.meets}
    assert meeting["2M×1t"].attainment == meeting["1M×2t"].attainment == 1.0
    assert d.action == pl.SCALE_UP and d.target == Shape(mixed=1, threads=2), d.reason


def test_attainment_counts_to_the_point_before_headroom(monkeypatch: pytest.MonkeyPatch) -> None:
    """S3's scale-up: 2M×1t predicted at 100 % with its TTFT p90 near the SLO, 1M×2t at 99.99 %
    with half of it. Below a point of attainment the headroom decides."""
    made = {Shape(mixed=1, threads=1): (0.80, 0.93), Shape(mixed=2, threads=1): (1.0, 0.80),
            Shape(mixed=1, threads=2): (0.9999, 0.47), Shape(prefill=1, decode=1, threads=1): (0.5, 0.9)}

    def fake(shape: Shape, *args: object, **kw: object) -> pl.Prediction:
        attainment, ttft = made[shape]
        return pl.Prediction(shape, ttft, 0.01, attainment, 0.5, attainment >= 0.9)

    monkeypatch.setattr(pl, "predict", fake)
    sig = load(0.5, 300, 20, Shape(mixed=1), [1], prefill_tps=1000.0)
    d = pl.decide(sig, pl.PlannerState(), config(ttft_slo_s=0.883))
    assert d.action == pl.SCALE_UP and d.target == Shape(mixed=1, threads=2), d.reason
