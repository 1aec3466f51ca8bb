"""``pdserve profile`` and ``pdserve simulate`` (``pdserve plan`` lives in :mod:`pdserve.sim.plan_cli`).

``simulate`` takes ``pdserve bench``'s workload, arrival and result options
(the same functions add them: same names, same seeds → same requests), the
deployment options of ``pdserve serve`` and the engine options of a worker,
plus where step times come from: ``--profile FILE`` (this machine, from
``pdserve profile``) or ``--hardware NAME [--tp N]`` (a roofline on paper;
``--decode-hardware``/``--decode-tp`` give the decode pool other parts).
It writes ``--output`` in the bench's result format.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pdserve.config import Role, SchedulerConfig
from pdserve.errors import ConfigError, PDServeError
from pdserve.modelspec.arch import ArchConfig
from pdserve.router.dispatch_config import DISAGG_POLICIES, ROUTING_POLICIES
from pdserve.sim.simulator import SimConfig, SimResult

if TYPE_CHECKING:
    from pdserve.sim.serving_probe import ProbeResult

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- profile


def add_profile_parser(sub: Any) -> None:
    """Add ``pdserve profile``."""
    from pdserve.cli import add_engine_args

    p = sub.add_parser("profile", help="time this machine's engine steps and KV links for the simulator")
    add_engine_args(p)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats (about a minute)")
    p.add_argument("--transports", default="shm,tcp", help="KV transports to time (comma-separated, or none)")
    p.add_argument("--output", default="profile.json", help="where to write the profile")
    p.add_argument("--no-serving", action="store_true",
                   help="skip measuring the serving overhead (a router + worker serving a few requests)")
    p.add_argument("--no-co-location", action="store_true",
                   help="skip measuring the steps' slowdown while another engine on this host computes")


def run_profile(args: argparse.Namespace) -> int:
    """Measure, fit and write a profile."""
    import torch

    from pdserve.cli import engine_options
    from pdserve.engine.llm import make_engine_config
    from pdserve.modelspec.arch import load_arch_config
    from pdserve.sim.profile import Profile, machine_identity, measure_link, measure_steps
    from pdserve.sim.step_model import fit_linear

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    config = make_engine_config(args.model, **engine_options(args))
    arch = load_arch_config(args.model)

    def say(msg: str) -> None:
        print(f"profile: {msg}", file=sys.stderr, flush=True)

    rounds: dict[Any, list[float]] = {}
    shapes, times = measure_steps(config, args.quick, say, rounds)
    fit = fit_linear(shapes, times)
    say(f"fitted {fit.num_samples} step shapes: median error {fit.median_abs_rel_error:.1%}, "
        f"p90 {fit.p90_abs_rel_error:.1%}")
    co_located = None
    if not args.no_co_location:
        from pdserve.sim.colocation import measure_co_location

        say("timing steps beside another engine (co-location)")
        co_located = measure_co_location(config, threads, progress=say)
    links = {}
    for transport in [t for t in args.transports.split(",") if t and t != "none"]:
        say(f"timing the {transport} KV link")
        links[transport] = measure_link(transport, arch.num_layers, arch.num_kv_heads, arch.head_dim,
                                        config.cache.block_size, config.model.dtype)
    serving = serving_handoff = co_located_served = None
    if not args.no_serving:
        say("serving a few requests through a router + worker(s) (serving overhead)")
        try:
            serving, serving_handoff, co_located_served = _measure_serving(args, config, fit.model, threads,
                                                                           links)
        except Exception as exc:  # optional: the step model and links are still worth writing
            say(f"warning: serving overhead not measured ({type(exc).__name__}: {exc}); the profile has "
                f"none (simulated as 0)")
    profile = Profile(
        model=args.model, arch=arch.as_dict(), machine=machine_identity(threads),
        engine={"dtype": config.model.dtype, "block_size": config.cache.block_size,
                "chunk_size": config.scheduler.chunk_size,
                "max_num_batched_tokens": config.scheduler.max_num_batched_tokens},
        step_model=fit.model,
        fit={"num_samples": fit.num_samples, "median_abs_rel_error": fit.median_abs_rel_error,
             "p90_abs_rel_error": fit.p90_abs_rel_error},
        links=links,
        samples=[{"shape": s.__dict__, "time_s": t, "rounds_s": rounds.get(s, [])}
                 for s, t in zip(shapes, times, strict=True)],
        serving=serving,
        serving_handoff=serving_handoff,
        co_located=co_located,
        co_located_served=co_located_served,
    )
    Path(args.output).write_text(json.dumps(profile.to_json(), indent=1) + "\n")
    print(f"step model (seconds): {json.dumps(fit.model.to_json())}")
    print(f"fit error over {fit.num_samples} shapes: median {fit.median_abs_rel_error:.1%}, "
          f"p90 {fit.p90_abs_rel_error:.1%}")
    for name, link in links.items():
        print(f"{name}: {link.bandwidth_bytes_per_s / 1e9:.2f} GB/s, latency {link.latency_s * 1e3:.2f} ms")
    for what, so in (("", serving), (" (hand-offs)", serving_handoff)):
        if so is not None:
            loaded = ("" if so.first_token_loaded_s is None
                      else f" ({so.first_token_loaded_s * 1e3:.1f} ms with requests arriving under load)")
            if so.probe_first_token_s is not None:
                loaded += (f" [{so.probe_first_token_s * 1e3:.1f} ms before correcting for the probe's own "
                           "prompt-step speed]")
            print(f"serving overhead{what}: {so.first_token_s * 1e3:.1f} ms before the first token{loaded}, "
                  f"{so.per_token_s * 1e3:.2f} ms per token, {so.per_row_s * 1e3:.2f} ms per further row "
                  f"({so.num_requests} requests)")
    if co_located is not None:
        print(f"co-located (another {threads}-thread engine computing on this host): prefill steps "
              f"×{co_located.prefill:.3f}, decode steps ×{co_located.decode:.3f}"
              + (f", decode steps beside a decoding engine ×{co_located.decode_beside_decode:.3f}"
                 if co_located.decode_beside_decode is not None else "")
              + f" ({co_located.num_samples} timed steps)")
        if co_located_served is not None:
            print(f"co-located, served (the hand-off probe's prefill worker beside its decoding worker): "
                  f"prefill steps ×{co_located_served.prefill:.3f} (used), decode steps "
                  f"×{co_located_served.decode:.3f} ({co_located_served.num_samples} steps)")
        if co_located.other_cpu_cores is not None and co_located.other_cpu_cores > 0.2:
            print(f"warning: other processes used {co_located.other_cpu_cores:.2f} cores meanwhile: the "
                  f"co-location figure includes time-slicing with them (take the profile on a quiet machine)")
    print(f"profile written to {args.output}")
    return 0


def engine_argv(args: argparse.Namespace) -> list[str]:
    """The engine options of ``args`` that differ from their defaults, as ``pdserve worker`` arguments."""
    from pdserve.cli import add_engine_args

    parser = argparse.ArgumentParser(add_help=False)
    add_engine_args(parser)
    argv: list[str] = []
    for action in parser._actions:
        value = getattr(args, action.dest, action.default)
        if not action.option_strings or action.dest == "model" or value == action.default:
            continue
        argv += [action.option_strings[0]] if action.nargs == 0 else [action.option_strings[0], str(value)]
    return argv


def _measure_serving(args: argparse.Namespace, config: Any, step_model: Any, threads: int,
                     links: dict[str, Any]) -> ProbeResult:
    from pdserve.engine.engine import resolve_max_model_len
    from pdserve.modelspec.arch import load_arch_config
    from pdserve.sim.deploy import DTYPE_BYTES, profile_num_blocks
    from pdserve.sim.serving_probe import ServedModel, measure_serving

    arch = load_arch_config(args.model)
    blocks = profile_num_blocks(arch, args.dtype, args.block_size, args.kv_cache_mib << 20, args.num_blocks)
    served = ServedModel(args.model, engine_argv(args), threads, step_model, config.scheduler,
                         args.block_size, blocks, resolve_max_model_len(config, arch), arch.vocab_size,
                         arch.num_layers, arch.kv_bytes_per_token(DTYPE_BYTES[args.dtype]))
    # hand-offs go over shm between workers of one host (the launcher's default), when it was timed
    return measure_serving(served, links.get("shm"))


# ----------------------------------------------------------------------------- simulate


def add_deployment_args(p: argparse.ArgumentParser) -> None:
    """``pdserve serve``'s deployment options and where step times come from."""
    from pdserve.cli import add_balance_arg, add_engine_args

    d = p.add_argument_group("deployment (as pdserve serve)")
    d.add_argument("--mode", default="disaggregated", choices=["disaggregated", "aggregated"])
    d.add_argument("--prefill", type=int, default=1, help="prefill workers (disaggregated)")
    d.add_argument("--decode", type=int, default=1, help="decode workers (disaggregated)")
    d.add_argument("--mixed", type=int, default=None,
                   help="mixed workers (aggregated: default 1; disaggregated: beside P and D, default 0)")
    d.add_argument("--policy", default="kv_aware", choices=list(ROUTING_POLICIES))
    d.add_argument("--disagg-policy", default="auto", choices=list(DISAGG_POLICIES),
                   help="prefill on a prefill worker: per request by cost (auto), always, "
                   "or never (decode worker)")
    add_balance_arg(d)  # type: ignore[arg-type]
    d.add_argument("--kv-transport", default=None, choices=["shm", "tcp"], help="profile link to use")
    d.add_argument("--threads-per-worker", type=int, default=None,
                   help="threads of each simulated worker (checked against the profile's)")
    e = p.add_argument_group("engine (as pdserve worker)")
    add_engine_args(e)  # type: ignore[arg-type]
    t = p.add_argument_group("step times")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--profile", default=None, metavar="FILE", help="from `pdserve profile` on this machine")
    src.add_argument("--hardware", default=None, help="roofline of an accelerator (h100, h200, a100, ...)")
    t.add_argument("--tp", type=int, default=1, help="tensor-parallel degree per worker (--hardware)")
    t.add_argument("--decode-hardware", default=None, help="decode pool's accelerator (default --hardware)")
    t.add_argument("--decode-tp", type=int, default=None, help="decode pool's TP (default --tp)")
    t.add_argument("--precision", default="bf16", choices=["bf16", "fp8"], help="weights, compute")
    t.add_argument("--hop-ms", type=float, default=0.2, help="one router↔worker message")
    t.add_argument("--request-overhead-ms", type=float, default=None,
                   help="work per request before placement (default: the profile's measured serving "
                        "overhead, else 1 ms)")


def add_simulate_parser(sub: Any) -> None:
    """Add ``pdserve simulate``."""
    from pdserve.bench.cli import add_load_args, add_results_args, add_workload_args

    # "resolve": the workload's --seed (added last) replaces the engine's dummy-weight --seed
    p = sub.add_parser("simulate", help="simulate a deployment under a bench workload (bench result format)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       conflict_handler="resolve")
    add_deployment_args(p)
    p.add_argument("--endpoint", default="completions", choices=["completions", "chat"])
    add_workload_args(p)
    add_load_args(p)
    add_results_args(p)
    from pdserve.sim.planner_cli import add_sim_planner_args

    add_sim_planner_args(p)  # serve's --planner slo options, and simulated start/flip times


def build_config(args: argparse.Namespace) -> tuple[SimConfig, ArchConfig]:
    """The :class:`SimConfig` of the options, and the model's shape."""
    from pdserve.modelspec.arch import load_arch_config
    from pdserve.sim.deploy import paper_pool, profile_num_blocks, profile_pool
    from pdserve.sim.hardware import accelerator, paper_model
    from pdserve.sim.profile import load_profile
    from pdserve.sim.roofline import RooflineStepModel, kv_link

    disagg = args.mode == "disaggregated"
    if disagg:
        counts = {Role.PREFILL: args.prefill, Role.DECODE: args.decode}
        if args.mixed:  # mixed workers beside P and D (the router's local candidates too)
            counts[Role.MIXED] = args.mixed
    else:
        counts = {Role.MIXED: 1 if args.mixed is None else args.mixed}
    for role, n in counts.items():
        if n < 1:
            raise ConfigError(f"the {role.value} pool needs ≥ 1 worker, got {n}")
    sched = SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                            max_num_seqs=args.max_num_seqs, chunk_size=args.chunk_size,
                            enable_chunked_prefill=not args.no_chunked_prefill)
    measured_overhead_s: float | None = None
    if args.profile:
        arch = load_arch_config(args.model)
        profile = load_profile(args.profile, args.model, args.threads_per_worker,
                               warn=lambda m: print(f"warning: {m}", file=sys.stderr))
        measured_overhead_s = profile.request_overhead_s
        kv_bytes = arch.kv_bytes_per_token(
            {"float32": 4, "bfloat16": 2, "float16": 2}[args.dtype])
        blocks = profile_num_blocks(arch, args.dtype, args.block_size, args.kv_cache_mib << 20,
                                    args.num_blocks)
        # senders: prefill workers, and mixed ones (they hand KV off both ways, as real ones do)
        link = profile.link(args.kv_transport) if disagg or profile.links else None
        pools = tuple(profile_pool(role, n, profile, blocks, link if role is not Role.DECODE else None)
                      for role, n in counts.items())
    else:
        arch = paper_model(args.model)
        first = RooflineStepModel(arch, accelerator(args.hardware), args.tp, args.precision)
        second = RooflineStepModel(arch, accelerator(args.decode_hardware or args.hardware),
                                   args.decode_tp or args.tp, args.precision)
        kv_bytes = first.kv_bytes_per_token
        models = {Role.MIXED: first, Role.PREFILL: first, Role.DECODE: second}
        # senders: prefill workers, and mixed ones (they hand KV off both ways, as real ones do)
        links = {Role.PREFILL: kv_link(first, second),
                 Role.MIXED: kv_link(first, second if disagg else first)}
        pools = tuple(paper_pool(role, n, models[role], args.block_size, links.get(role), args.num_blocks)
                      for role, n in counts.items())
    max_model_len = min(args.max_model_len or arch.max_position_embeddings, arch.max_position_embeddings)
    # as the workers do (and the router, from their registrations): no longer than the smallest cache
    from pdserve.engine.engine import cap_to_kv_capacity  # here: importing it loads torch

    max_model_len = cap_to_kv_capacity(max_model_len, args.max_model_len is not None,
                                       min(pool.num_blocks for pool in pools), args.block_size)
    overhead_s = 1e-3 if args.request_overhead_ms is None else args.request_overhead_ms / 1e3
    handoff_s = 0.0
    if args.request_overhead_ms is None and measured_overhead_s is not None:
        overhead_s = measured_overhead_s  # measured by `pdserve profile` (pdserve.sim.serving)
        handoff_s = profile.handoff_overhead_s
    config = SimConfig(pools=pools, scheduler=sched, block_size=args.block_size,
                       enable_prefix_caching=not args.no_prefix_caching, max_model_len=max_model_len,
                       num_layers=arch.num_layers, kv_bytes_per_token=kv_bytes, policy=args.policy,
                       disagg_policy=args.disagg_policy, balance_factor=args.balance_factor or None,
                       hop_s=args.hop_ms / 1e3, request_overhead_s=overhead_s, handoff_overhead_s=handoff_s,
                       seed=getattr(args, "seed", 0))
    return config, arch


def routing_summary(config: SimConfig, rate: float, sim: SimResult) -> dict[str, Any]:
    """The router's decisions of one simulated run (for the summary and ``--output``)."""
    return {"rate": rate, "policy": config.policy, "disagg_policy": config.disagg_policy,
            "decisions": sim.decisions, "kv_bytes": sim.kv_bytes,
            "num_remote": sum(r.prefill_id is not None for r in sim.routes),
            "num_local": sum(r.prefill_id is None for r in sim.routes),
            "computed_by": dict(sorted(Counter(r.prefill_id or r.decode_id for r in sim.routes).items()))}


def format_routing(summary: dict[str, Any]) -> str:
    """One line: policies, placements by reason, KV moved."""
    decisions = ", ".join(f"{k} {v}" for k, v in summary["decisions"].items()) or "none"
    return (f"routing ({summary['policy']}, disagg {summary['disagg_policy']}): {decisions}; "
            f"KV moved {summary['kv_bytes'] / 1e6:.1f} MB; prompts computed by {summary['computed_by']}")


def run_simulate(args: argparse.Namespace) -> int:
    """Run ``pdserve simulate``; 0 on success, 2 on bad options."""
    try:
        return _simulate(args)
    except (PDServeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _simulate(args: argparse.Namespace) -> int:
    from pdserve.bench.arrivals import ArrivalConfig
    from pdserve.bench.cli import DEFAULT_NUM_REQUESTS, _parse_rates, _parse_warmup, workload_config
    from pdserve.bench.metrics import SLO
    from pdserve.bench.report import format_summary, format_sweep, result_json, write_json
    from pdserve.bench.runner import SweepResult
    from pdserve.bench.workload import make_workload
    from pdserve.sim.deploy import PromptEncoder, make_requests, workload_counter
    from pdserve.sim.elastic import PlannedResult, PlannedSimulator
    from pdserve.sim.planner_cli import elastic_config, format_planner, planner_summary, plot_planner
    from pdserve.sim.results import simulate_run
    from pdserve.sim.simulator import Simulator

    if getattr(args, "max_concurrency", None):
        raise ConfigError("--max-concurrency is not simulated (open-loop arrivals only)")
    config, arch = build_config(args)
    elastic = elastic_config(args, build_config)
    simulator = Simulator if elastic is None else functools.partial(PlannedSimulator, elastic=elastic)
    workload = workload_config(args)
    encoder = PromptEncoder(args.model, args.endpoint, arch.vocab_size)
    counter = workload_counter(args.tokenizer, encoder, args.model)
    slo = SLO.parse(args.slo)
    warmup_requests, warmup_s = _parse_warmup(args.warmup)
    num_requests = args.num_requests
    if num_requests is None and args.duration is None:
        num_requests = DEFAULT_NUM_REQUESTS
    rates = _parse_rates(args.sweep) if args.sweep else [args.request_rate]
    runs, routing, planner = [], [], []
    for rate in rates:
        arrivals = ArrivalConfig(rate=rate, kind=args.arrival, burstiness=args.burstiness, seed=args.seed)
        planned = make_requests(make_workload(workload, counter), arrivals, encoder, config.max_model_len,
                                num_requests, args.duration, warmup_requests, warmup_s)
        run, sim = simulate_run(config, planned, rate, slo, simulator)
        runs.append(run)
        title = f"simulated {args.model} {args.workload} ({sim.num_steps} steps in {sim.wall_s:.1f} s)"
        print(format_summary(run, title=title), flush=True)
        routing.append(routing_summary(config, rate, sim))
        print(format_routing(routing[-1]), flush=True)
        if isinstance(sim, PlannedResult):
            planner.append(planner_summary(rate, sim))
            print(format_planner(planner[-1]), flush=True)
    sweep = None
    if args.sweep:
        sweep = SweepResult(runs=runs, target=args.attainment_target)
        sweep.attainment = {r.rate: r.summary.attainment for r in runs}
        meeting = [r for r, a in sweep.attainment.items() if a >= args.attainment_target]
        sweep.max_rate = max(meeting) if meeting else None
        print(format_sweep(sweep))
    if args.output:
        cfg = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
               for k, v in vars(args).items() if not callable(v)}
        cfg["simulated"] = True
        cfg["pools"] = [{"role": p.role.value, "count": p.count, "label": p.label, "num_blocks": p.num_blocks,
                         "price_per_hour": p.price_per_hour} for p in config.pools]
        result = result_json(cfg, runs, sweep, not args.no_request_records)
        result["routing"] = routing  # per run: placements by reason, KV moved
        if planner:
            result["planner"] = planner  # per run: the decisions and the pool sizes over time
        print(f"results written to {write_json(args.output, result)}")
    if args.plots:
        from pdserve.bench.plots import MISSING_MESSAGE, have_matplotlib, write_plots

        if not have_matplotlib():
            print(f"warning: {MISSING_MESSAGE}; no plots will be written", file=sys.stderr)
        else:
            for path in [*write_plots(args.plots, runs, sweep), *plot_planner(args.plots, planner)]:
                print(f"plot written to {path}")
    return 1 if all(r.summary.num_ok == 0 for r in runs) else 0
