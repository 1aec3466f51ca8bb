"""``pdserve serve``'s planner options: ``--planner slo --ttft-ms T --itl-ms I ...``."""

from __future__ import annotations

import argparse
import os

from pdserve.config import SchedulerConfig
from pdserve.planner.planner import PlannerConfig
from pdserve.planner.thread_scaling import ThreadScaling


def add_planner_args(parser: argparse.ArgumentParser) -> None:
    """Add the planner's options to ``serve``'s parser."""
    g = parser.add_argument_group("SLO planner (docs/planner.md)")
    g.add_argument(
        "--planner",
        default="none",
        choices=["none", "slo"],
        help="slo: size the prefill/decode/mixed pools to the SLOs as the load changes",
    )
    g.add_argument("--ttft-ms", type=float, default=None, help="TTFT SLO (ms)")
    g.add_argument(
        "--itl-ms", type=float, default=None, help="inter-token latency SLO (ms; a request's mean gap)"
    )
    g.add_argument(
        "--ttft-per-token-ms",
        type=float,
        default=0.0,
        help="length-aware TTFT SLO: a request may take --ttft-ms + this × its prompt tokens",
    )
    g.add_argument(
        "--max-gap-ms",
        type=float,
        default=None,
        help="stall SLO: the longest gap between two tokens of a request (prompt chunks on mixed workers)",
    )
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--max-workers", type=int, default=None, help="budget: most workers at once")
    budget.add_argument(
        "--max-cores",
        type=int,
        default=None,
        help="budget: most cores (workers × threads); without --threads-per-worker the planner also "
        "chooses each worker's threads (measured at start-up, docs/planner.md)",
    )
    g.add_argument("--min-workers", type=int, default=1, help="the floor (zero traffic goes here)")
    g.add_argument("--interval", type=float, default=10.0, help="seconds between decisions")
    g.add_argument(
        "--planner-window",
        type=float,
        default=None,
        help="seconds of traffic each decision reads (default: 3 intervals, at least 5 s)",
    )
    g.add_argument("--down-intervals", type=int, default=3, help="intervals a smaller shape must win first")
    g.add_argument("--attainment", type=float, default=0.9, help="share of requests to keep within both SLOs")
    d = PlannerConfig(ttft_slo_s=1.0, itl_slo_s=1.0)  # the tuning defaults
    g.add_argument(
        "--over-capacity-gain",
        type=float,
        default=d.over_capacity_gain,
        help="when no shape meets the SLOs, reshape only for this much more attainment (default %(default)s)",
    )
    g.add_argument(
        "--decode-smoothing",
        type=float,
        default=d.decode_smoothing,
        help="weight of a window's decode-step fit against the carried one, in (0, 1] (default %(default)s)",
    )
    g.add_argument(
        "--min-onset",
        type=int,
        default=d.min_onset,
        help="fewest arrivals to read a load that started in the window at its rate (default %(default)s)",
    )
    g.add_argument(
        "--load-tolerance",
        type=float,
        default=d.load_tolerance,
        help="the measured record per shape expires when the arrival rate or the mean prompt moves past "
        "(1 + this)x or below 1/(1 + this)x of its reference (default %(default)s)",
    )
    g.add_argument(
        "--record-intervals",
        type=int,
        default=d.record_intervals,
        help="intervals of measurement kept per shape (default %(default)s)",
    )
    g.add_argument(
        "--prediction-drift",
        type=float,
        default=d.prediction_drift,
        help="set the shape in place's measured record aside when the model's attainment for it moves "
        "further than this from its mean over the record (default %(default)s)",
    )


def budget(args: argparse.Namespace) -> tuple[int, int]:
    """(most workers, threads per worker) of the planner's budget."""
    cores = os.cpu_count() or 1
    if args.max_cores:
        threads = args.threads_per_worker or 1
        return max(args.max_cores // threads, 1), threads
    workers = args.max_workers or max(cores, 1)
    return workers, args.threads_per_worker or max(cores // workers, 1)


def chooses_threads(args: argparse.Namespace) -> bool:
    """The planner chooses the workers' threads: a core budget and no fixed ``--threads-per-worker``."""
    return getattr(args, "planner", "none") == "slo" and bool(args.max_cores) and not args.threads_per_worker


def start_threads(args: argparse.Namespace, num_workers: int) -> int:
    """Threads of each worker the planner's deployment starts with: the core budget shared by the
    initial workers when the planner chooses threads, else the budget's fixed share."""
    if chooses_threads(args):
        return max(args.max_cores // max(num_workers, 1), 1)
    return budget(args)[1]


def thread_counts(args: argparse.Namespace) -> list[int]:
    """The thread counts to measure when the planner chooses threads: 1 up to the core budget
    (at most this host's cores); none when that leaves one count (nothing to choose)."""
    counts = list(range(1, min(args.max_cores, os.cpu_count() or 1) + 1)) if chooses_threads(args) else []
    return counts if len(counts) > 1 else []


def planner_config(args: argparse.Namespace, thread_scaling: ThreadScaling | None = None) -> PlannerConfig:
    """The :class:`PlannerConfig` of ``serve``'s options (``thread_scaling``: the measured table
    when the planner chooses threads); raises ValueError on bad ones."""
    if args.ttft_ms is None or args.itl_ms is None:
        raise ValueError("--planner slo needs --ttft-ms and --itl-ms")
    if args.interval <= 0:
        raise ValueError(f"--interval must be > 0, got {args.interval}")
    if not 0 < args.attainment <= 1:
        raise ValueError(f"--attainment must be in (0, 1], got {args.attainment}")
    max_workers, _ = budget(args)
    initial = args.mixed if args.mode == "aggregated" else args.prefill + args.decode
    if initial > max_workers:
        raise ValueError(f"the initial shape has {initial} workers, more than the budget of {max_workers}")
    choose = chooses_threads(args)
    return PlannerConfig(
        ttft_per_token_s=(getattr(args, "ttft_per_token_ms", 0.0) or 0.0) / 1000,
        max_gap_s=None if getattr(args, "max_gap_ms", None) is None else args.max_gap_ms / 1000,
        chunk_tokens=chunk_tokens(args),
        ttft_slo_s=args.ttft_ms / 1000,
        itl_slo_s=args.itl_ms / 1000,
        max_workers=max_workers,
        min_workers=args.min_workers,
        attainment_target=args.attainment,
        down_intervals=max(args.down_intervals, 1),
        ready_timeout_s=args.ready_timeout,
        max_cores=args.max_cores if choose else None,
        thread_scaling=thread_scaling if choose else None,
        **{k: getattr(args, k) for k in TUNING if getattr(args, k, None) is not None},
    )


#: ``PlannerConfig`` fields set by options of the same name (``--over-capacity-gain`` ...).
TUNING = ("over_capacity_gain", "decode_smoothing", "min_onset", "load_tolerance", "record_intervals",
          "prediction_drift")


def chunk_tokens(args: argparse.Namespace) -> int:
    """The workers' prompt tokens per step: ``--chunk-size`` (the simulator's engine option, or in
    ``serve``'s ``--worker-args``), else the engine's default."""
    size = getattr(args, "chunk_size", None)
    worker_args = list(getattr(args, "worker_args", None) or [])
    for i, arg in enumerate(worker_args):
        if arg == "--chunk-size" and i + 1 < len(worker_args):
            size = worker_args[i + 1]
        elif arg.startswith("--chunk-size="):
            size = arg.split("=", 1)[1]
    try:
        return int(size) if size is not None else SchedulerConfig().chunk_size
    except ValueError:
        return SchedulerConfig().chunk_size


def window_s(args: argparse.Namespace) -> float:
    """Seconds of traffic each decision reads."""
    return float(args.planner_window or max(3 * args.interval, 5.0))
