"""``pdserve simulate --planner slo``: the SLO planner's options on the simulator (docs/simulator.md).

The planner's options are ``pdserve serve``'s own (:func:`pdserve.planner.options.add_planner_args`:
same names, same defaults, same checks); this module adds how simulated workers start and flip, and
turns the options into an :class:`~pdserve.sim.elastic.ElasticConfig`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pdserve.config import Role
from pdserve.errors import ConfigError
from pdserve.planner import options as planner_options
from pdserve.planner import thread_scaling as ts
from pdserve.planner.thread_scaling import ThreadScaling
from pdserve.sim.elastic import FLIP_S, START_S, ElasticConfig, PlannedResult
from pdserve.sim.simulator import SimConfig
from pdserve.sim.spec import PoolSpec
from pdserve.sim.step_model import StepModel, StepShape


def add_sim_planner_args(p: argparse.ArgumentParser) -> None:
    """``serve``'s planner options, its ``--ready-timeout``, and the simulated start and flip times."""
    planner_options.add_planner_args(p)
    g = p.add_argument_group("simulated scaling (with --planner slo)")
    g.add_argument("--ready-timeout", type=float, default=120.0,
                   help="seconds a planner decision may take to be carried out before it is given up "
                   "(as pdserve serve's)")
    g.add_argument("--worker-start-s", type=float, default=START_S,
                   help=f"seconds from the supervisor starting a worker to its registration (default "
                   f"{START_S}: the median scale-to-first-request of a new process measured on this 2-core "
                   "machine, tiny, benchmarks/results/s9_elasticity.json)")
    g.add_argument("--thread-profile", action="append", default=[], metavar="T=FILE",
                   help="with --max-cores and no --threads-per-worker: the profile taken with T threads "
                   "(repeatable); the planner then chooses each worker's threads among --profile's and "
                   "these, and a worker set to T steps with FILE's step model")
    g.add_argument("--flip-s", type=float, default=FLIP_S,
                   help=f"seconds from a drained worker's last request to its registration in its new role "
                   f"(default {FLIP_S}: the median flip-to-first-request measured there)")


def elastic_config(args: argparse.Namespace, build: Callable[[argparse.Namespace], tuple[SimConfig, Any]]
                   ) -> ElasticConfig | None:
    """The planner's settings of the options (None with ``--planner none``); ``build`` is
    ``pdserve.sim.cli.build_config``: a worker of each role is built as the deployment's are."""
    if args.planner != "slo":
        return None
    resolved = argparse.Namespace(**vars(args))
    if resolved.mode == "aggregated" and resolved.mixed is None:
        resolved.mixed = 1
    if resolved.mode == "disaggregated" and resolved.mixed:
        raise ConfigError("--planner slo starts from an aggregated or a prefill+decode shape, not both "
                          "(the planner's shapes have no mixed workers beside P and D)")
    if args.worker_start_s < 0 or args.flip_s < 0:
        raise ConfigError("--worker-start-s and --flip-s must be ≥ 0")
    every_role = argparse.Namespace(**{**vars(args), "mode": "disaggregated", "prefill": 1, "decode": 1,
                                       "mixed": 1})
    templates = {pool.role: pool for pool in build(every_role)[0].pools}
    assert set(templates) == set(Role)
    base, by_threads = _thread_templates(args, every_role, build)
    table = None
    if by_threads:
        by_threads = {base: templates, **by_threads}
        table = thread_scaling_of(by_threads, resolved.chunk_size)
    try:
        planner = planner_options.planner_config(resolved, thread_scaling=table)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return ElasticConfig(planner, templates, interval_s=args.interval,
                         window_s=planner_options.window_s(args), start_s=args.worker_start_s,
                         flip_s=args.flip_s, base_threads=base, thread_templates=by_threads)


def _thread_templates(args: argparse.Namespace, every_role: argparse.Namespace,
                      build: Callable[[argparse.Namespace], tuple[SimConfig, Any]]
                      ) -> tuple[int, dict[int, dict[Role, PoolSpec]]]:
    """(--profile's thread count, a worker of each role per ``--thread-profile``); (0, {}) without
    ``--thread-profile`` (the threads are not the planner's then); raises ConfigError where the
    planner could not choose threads with them."""
    from pdserve.sim.profile import load_profile

    if not args.thread_profile:
        return 0, {}  # (build_config has read --profile already; nothing here needs its threads)
    if not args.profile or not planner_options.chooses_threads(args):
        raise ConfigError("--thread-profile needs --profile, --max-cores and no --threads-per-worker "
                          "(the planner chooses the threads only then)")
    base = int(load_profile(args.profile, args.model).machine.get("threads") or 0)
    out: dict[int, dict[Role, PoolSpec]] = {}
    for item in args.thread_profile:
        count, _, path = item.partition("=")
        if not count.isdigit() or int(count) < 1 or not path:
            raise ConfigError(f"--thread-profile {item!r}: give T=FILE with T >= 1 threads")
        at = argparse.Namespace(**{**vars(every_role), "profile": path, "threads_per_worker": int(count)})
        out[int(count)] = {pool.role: pool for pool in build(at)[0].pools}
    if base in out or not base:
        raise ConfigError(f"--profile was taken with {base or 'unknown'} threads: give the other counts "
                          "with --thread-profile")
    return base, out


def thread_scaling_of(templates: Mapping[int, Mapping[Role, PoolSpec]], chunk_tokens: int) -> ThreadScaling:
    """The planner's thread table computed on each count's mixed-worker step model, for the scenarios
    ``pdserve serve`` times on the engine (:mod:`pdserve.planner.thread_scaling`): one chunk-long
    prompt, and decode batches of 1 and ``DECODE_BATCH`` at its prompts' context."""
    n = max(min(ts.PREFILL_TOKENS, chunk_tokens), 1)
    ctx = ts.DECODE_PROMPT + ts.DECODE_STEPS // 2
    speeds = {}
    for threads, pools in templates.items():
        model = pools[Role.MIXED].step_model

        def decode(batch: int, model: StepModel = model) -> float:
            return model.step_time_s(StepShape(batch, 0, batch, 0.0, batch * ctx, 0, batch, batch * ctx))

        prefill = model.step_time_s(StepShape(n, n, 0, n * (n + 1) / 2, 0, 0, 1, 0))
        one, many = decode(1), decode(ts.DECODE_BATCH)
        speeds[threads] = ts.ThreadSpeed(n / prefill, one, max((many - one) / (ts.DECODE_BATCH - 1), 0.0))
    return ts.ThreadScaling(speeds)


def planner_summary(rate: float, result: PlannedResult) -> dict[str, Any]:
    """One run's planner record for ``--output``: decisions (``Decision.as_dict()``) and pools over time."""
    return {"rate": rate, "history": result.planner, "pools": result.pools}


def format_planner(summary: dict[str, Any]) -> str:
    """One line: the actions taken and the shapes gone through."""
    history = summary["history"]
    actions: dict[str, int] = {}
    for d in history:
        actions[d["action"]] = actions.get(d["action"], 0) + 1
    shapes: list[str] = []
    for d in history:
        if not shapes or shapes[-1] != d["shape"]:
            shapes.append(str(d["shape"]))
    counts = ", ".join(f"{k} {v}" for k, v in sorted(actions.items())) or "no decision"
    return f"planner: {counts}; shapes {' -> '.join(shapes) or '-'}"


def plot_planner(out_dir: str, summaries: list[dict[str, Any]]) -> list[Path]:
    """``planner_pools.png`` per run (the bench's pool plot; needs matplotlib)."""
    from pdserve.bench.planner_plot import plot_pools

    paths = []
    for s in summaries:
        if s["history"]:
            name = "planner_pools.png" if len(summaries) == 1 else f"planner_pools_{s['rate']:g}.png"
            paths.append(plot_pools(out_dir, s["history"], name))
    return paths
