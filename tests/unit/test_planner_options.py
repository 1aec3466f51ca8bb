"""``pdserve serve``'s planner options and the early-shedding limit the planner hands the router."""

from __future__ import annotations

import argparse

import pytest

from pdserve.planner import options
from pdserve.planner.planner import PlannerConfig, PlannerState, decide
from pdserve.planner.runner import shed_limit
from pdserve.planner.signals import Shape, parse


def serve_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="aggregated")
    p.add_argument("--mixed", type=int, default=1)
    p.add_argument("--prefill", type=int, default=1)
    p.add_argument("--decode", type=int, default=1)
    p.add_argument("--threads-per-worker", type=int, default=0)
    p.add_argument("--ready-timeout", type=float, default=60.0)
    options.add_planner_args(p)
    return p.parse_args(argv)


def test_defaults_keep_the_planner_off() -> None:
    assert serve_args().planner == "none"


def test_slo_config_from_options() -> None:
    cfg = options.planner_config(
        serve_args(
            "--planner",
            "slo",
            "--ttft-ms",
            "500",
            "--itl-ms",
            "40",
            "--max-cores",
            "4",
            "--threads-per-worker",
            "2",
        )
    )
    assert cfg.ttft_slo_s == 0.5 and cfg.itl_slo_s == 0.04
    assert cfg.max_workers == 2  # 4 cores / 2 threads per worker
    assert options.budget(serve_args("--max-workers", "3", "--threads-per-worker", "1")) == (3, 1)


def test_tuning_options_reach_the_config_and_keep_the_defaults() -> None:
    base = ("--planner", "slo", "--ttft-ms", "500", "--itl-ms", "40")
    default = options.planner_config(serve_args(*base))
    assert (default.over_capacity_gain, default.decode_smoothing, default.min_onset) == (0.05, 0.3, 8)
    assert (default.load_tolerance, default.record_intervals, default.prediction_drift) == (1.0, 12, 0.2)
    cfg = options.planner_config(
        serve_args(*base, "--over-capacity-gain", "0.1", "--decode-smoothing", "0.5", "--min-onset", "5",
                   "--load-tolerance", "0.5", "--record-intervals", "6", "--prediction-drift", "0.3")
    )
    assert (cfg.over_capacity_gain, cfg.decode_smoothing, cfg.min_onset) == (0.1, 0.5, 5)
    assert (cfg.load_tolerance, cfg.record_intervals, cfg.prediction_drift) == (0.5, 6, 0.3)


@pytest.mark.parametrize(
    "argv",
    [
        ("--planner", "slo", "--itl-ms", "40"),  # no TTFT SLO
        ("--planner", "slo", "--ttft-ms", "500", "--itl-ms", "40", "--interval", "0"),
        ("--planner", "slo", "--ttft-ms", "500", "--itl-ms", "40", "--max-workers", "1", "--mixed", "2"),
        (
            "--planner",
            "slo",
            "--ttft-ms",
            "500",
            "--itl-ms",
            "40",
            "--max-workers",
            "2",
            "--min-workers",
            "3",
        ),
        ("--planner", "slo", "--ttft-ms", "500", "--itl-ms", "40", "--decode-smoothing", "0"),
        ("--planner", "slo", "--ttft-ms", "500", "--itl-ms", "40", "--min-onset", "1"),
        ("--planner", "slo", "--ttft-ms", "500", "--itl-ms", "40", "--over-capacity-gain", "-0.1"),
        ("--planner", "slo", "--ttft-ms", "500", "--itl-ms", "40", "--load-tolerance", "0"),
        ("--planner", "slo", "--ttft-ms", "500", "--itl-ms", "40", "--record-intervals", "0"),
        ("--planner", "slo", "--ttft-ms", "500", "--itl-ms", "40", "--prediction-drift", "0"),
    ],
)
def test_bad_options_are_clear_errors(argv: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        options.planner_config(serve_args(*argv))


def test_shed_limit_only_past_capacity() -> None:
    traces = [
        {
            "arrived_unix_s": 99.0 + i / 50,
            "num_prompt_tokens": 900,
            "num_tokens": 20,
            "ttft_s": 0.5,
            "e2e_s": 1.0,
            "last_token_s": 1.0,
            "outcome": "finished",
            "ttft_breakdown": {"prefill_s": 0.9, "exact": True},
        }
        for i in range(50)
    ]
    sig = parse(traces, {"workers": []}, "", now_s=100.0, window_s=2.0)
    cfg = PlannerConfig(ttft_slo_s=0.2, itl_slo_s=0.05, max_workers=2)
    fresh = decide(sig, PlannerState(), cfg)
    # the misses of a window the shape was not in place for all of (a transition) refuse nothing
    assert fresh.over_capacity and not fresh.inputs["steady_window"] and shed_limit(fresh) is None
    steady = PlannerState()
    steady.in_place = (sig.targets, sig.taken_s - 2 * sig.window_s)
    d = decide(sig, steady, cfg)
    assert d.over_capacity and d.inputs["steady_window"]
    limit = shed_limit(d)
    assert limit is not None and limit >= 4
    # over capacity on the prediction, but the window measured the SLOs met: nothing is refused
    met = [{**t, "ttft_s": 0.1} for t in traces]
    met_sig = parse(met, {"workers": []}, "", now_s=100.0, window_s=2.0)
    steady_met = PlannerState()
    steady_met.in_place = (met_sig.targets, met_sig.taken_s - 4.0)
    d_met = decide(met_sig, steady_met, cfg)
    assert d_met.over_capacity and d_met.inputs["attainment"] == 1.0 and shed_limit(d_met) is None
    calm = parse(traces[:2], {"workers": []}, "", now_s=100.0, window_s=60.0)
    assert shed_limit(decide(calm, PlannerState(), PlannerConfig(ttft_slo_s=5, itl_slo_s=1))) is None
    assert d.target.workers <= 2 and Shape.of(d.target.targets()) == d.target
