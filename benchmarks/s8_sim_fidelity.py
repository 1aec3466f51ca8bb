"""S8 — simulator fidelity: simulated vs measured TTFT and TPOT on the same requests; the simulator's speed.

1. Profile this machine in the same run: ``pdserve profile --model bench-50m
   --quick`` with S3's engine options (``--chunk-size 256
   --no-prefix-caching``), 2 threads for the ``agg`` worker and 1 thread for
   each worker of ``agg2`` and ``disagg``. By default (``--profile-each
   cell``) a profile is taken right before each cell — each configuration
   and rate is launched on its own, a few seconds after its profile — and
   that cell is simulated from it: this VM's step speed drifts by tens of
   per cent over minutes, so a profile taken 20 minutes before a cell can
   describe another machine. ``--profile-each config`` profiles before each
   configuration; ``--profile-each run`` once per thread count at the start.
   Per-deployment profiles are kept in ``benchmarks/results/s8_profiles/``;
   each cell records its profile and its age.
2. Measure: S3's configurations (:mod:`s3_goodput`'s ``setups`` and
   ``run_setup``: 1 warm-up + 12 requests per rate of the chat mix, Poisson,
   seed 0, rates 0.25, 0.5 and 0.75 req/s — fewer and lower than S3's quick
   run, because the shared machine was loaded ~7× over its 2 cores when this
   was written and a rate took 6 minutes; S3's SLO derived the same way) —
   real router and worker processes driven over HTTP.
3. Simulate: the same configurations from the profiles (the real scheduler
   and block manager, the router's placement as S3's router runs it:
   ``kv_aware``, S3's ``--disagg-policy`` (``always``), the shm link as
   profiled), the same seeded requests (the bench's workload and arrival
   generators with the same token counter), judged by the same SLO.
4. Compare per configuration and rate: TTFT and TPOT p50 and p90, simulated
   / measured − 1 (targets: p50 within 15%, p90 within 25%), and the SLO
   attainment both ways.
   Each cell keeps its requests, measured beside simulated (send time,
   lengths, TTFT, TPOT, and the router's own TTFT breakdown — queue, prefill,
   transfer, delivery — which the router sends with ``--trace-responses``,
   on unless ``--no-trace``), so that a gap can be traced per request
   (``benchmarks/s8_gap_analysis.py``).
5. Speed: 10,000 requests of the chat mix simulated on a 16-worker
   deployment (llama-3-8b on H100 roofline: 16 mixed workers, and 8 prefill
   + 8 decode), wall seconds (target < 60 s).

The machine is shared with other developers' jobs: the measured side is
under that load (the CPU meter of S3 reports other processes' share per
rate), the profile too; the result file records the load average.

    python benchmarks/s8_sim_fidelity.py [--configs agg agg2 disagg] [--rates 0.25 0.5 0.75]
                                         [--num-requests 12] [--speed-requests 10000] [--skip-measure]
                                         [--profile-each cell|config|run] [--out FILE]

Writes ``benchmarks/results/s8_sim_fidelity.json`` and, only when it writes
that file, the S8 section of ``docs/cost.md`` (``s8_report.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import s3_goodput as s3
import s8_report
import s8_steps
from common import REPO_ROOT, RESULTS_DIR, machine_info, ratio, write_json

from pdserve.bench.arrivals import ArrivalConfig
from pdserve.bench.metrics import SLO
from pdserve.bench.runner import RunResult
from pdserve.bench.workload import WorkloadConfig, make_counter, make_workload
from pdserve.config import Role, SchedulerConfig
from pdserve.modelspec.arch import load_arch_config
from pdserve.sim.deploy import PromptEncoder, make_requests, profile_num_blocks
from pdserve.sim.hardware import accelerator, paper_model
from pdserve.sim.profile import Profile, load_profile
from pdserve.sim.results import simulate_run
from pdserve.sim.roofline import RooflineStepModel, kv_link
from pdserve.sim.serving import apply_serving
from pdserve.sim.simulator import PoolSpec, SimConfig, SimResult, Simulator
from pdserve.sim.step_model import StepModel
from pdserve.worker.step_log import ENV as STEP_LOG_ENV

MODEL = s3.MODEL
RESULTS = RESULTS_DIR / "s8_sim_fidelity.json"
TARGETS = {"p50": 0.15, "p90": 0.25}
METRICS = s8_report.METRICS
PROFILE_DIR = RESULTS_DIR / "s8_profiles"  # --profile-each config/cell: one profile file per deployment
KV_CACHE_BYTES = 512 << 20  # the worker's default --kv-cache-mib


def take_profile(threads: int, chunk_size: int, out: Path) -> Profile:
    """Run ``pdserve profile`` in a child process (its own torch thread count)."""
    cmd = [sys.executable, "-m", "pdserve.cli", "profile", "--model", MODEL, "--quick",
           "--threads", str(threads), "--chunk-size", str(chunk_size), "--no-prefix-caching",
           "--output", str(out)]
    print(f"$ pdserve {' '.join(cmd[3:])}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"    ({time.perf_counter() - t0:.0f} s)", flush=True)
    return load_profile(out, MODEL, threads)


def threads_of(key: str) -> int:
    """Torch threads per worker in S3's configuration ``key`` (its profile's thread count)."""
    return 2 if key == "agg" else 1


def sim_config(key: str, profiles: dict[int, Profile], chunk_size: int, disagg_policy: str = "always",
               speed: dict[str, float] | None = None) -> SimConfig:
    """The simulated twin of one of S3's configurations (``speed``: its step models scaled per step kind
    by the served steps' measured speed, :class:`s8_steps.KindScaled` — a diagnostic)."""
    arch = load_arch_config(MODEL)
    blocks = profile_num_blocks(arch, "float32", 16, KV_CACHE_BYTES, None)
    own = profiles[threads_of(key)]

    def steps(p: Profile, role: Role = Role.MIXED) -> StepModel:
        """The profile's model with its serving overhead (the hand-offs' on a decode worker)."""
        if speed is None:
            return p.pool_step_model(role)
        handoff = role is Role.DECODE and p.serving_handoff is not None
        serving = p.serving_handoff if handoff else p.serving
        return apply_serving(s8_steps.KindScaled(p.step_model, speed), serving)

    # every worker on this host: a step slows down by the profile's co-location figure while another computes
    co, shm = own.co_location, own.link("shm")
    pools = {
        "agg": (PoolSpec(Role.MIXED, 1, steps(own), blocks, co_location=co),),
        # real mixed workers may hand KV to each other (the router's cost model decides): so may these
        "agg2": (PoolSpec(Role.MIXED, 2, steps(own), blocks, link=shm, co_location=co),),
        "disagg": (PoolSpec(Role.PREFILL, 1, steps(own), blocks, link=shm, co_location=co),
                   PoolSpec(Role.DECODE, 1, steps(own, Role.DECODE), blocks, co_location=co)),
    }[key]
    measured = own.request_overhead_s  # before the first token; None: not measured
    overhead_s = SimConfig.request_overhead_s if measured is None else measured
    return SimConfig(pools=pools, scheduler=SchedulerConfig(chunk_size=chunk_size), block_size=16,
                     enable_prefix_caching=False, max_model_len=arch.max_position_embeddings,
                     num_layers=arch.num_layers, kv_bytes_per_token=arch.kv_bytes_per_token(4),
                     disagg_policy=disagg_policy, request_overhead_s=overhead_s,
                     handoff_overhead_s=own.handoff_overhead_s)


def simulate(key: str, profiles: dict[int, Profile], args: argparse.Namespace, workload: WorkloadConfig,
             rate: float, slo: SLO, speed: dict[str, float] | None = None) -> RunResult:
    """The seeded requests S3 sends at ``rate``, through the simulated configuration."""
    return simulate_steps(key, profiles, args, workload, rate, slo, speed=speed)[0]


def simulate_steps(key: str, profiles: dict[int, Profile], args: argparse.Namespace, workload: WorkloadConfig,
                   rate: float, slo: SLO, record_steps: bool = False, speed: dict[str, float] | None = None
                   ) -> tuple[RunResult, SimResult]:
    """:func:`simulate`, and the simulator's result (with every step when ``record_steps``)."""
    counter = make_counter(MODEL)
    config = sim_config(key, profiles, args.chunk_size, args.s3.disagg_policy, speed)
    encoder = PromptEncoder(MODEL, "completions", load_arch_config(MODEL).vocab_size)
    arrivals = ArrivalConfig(rate=rate, seed=args.seed)
    planned = make_requests(make_workload(workload, counter), arrivals, encoder, config.max_model_len,
                            args.num_requests, None, args.warmup_requests)
    return simulate_run(config, planned, rate, slo, lambda c: Simulator(c, record_steps=record_steps))


def paired_requests(measured: RunResult, simulated: RunResult) -> list[dict[str, Any]]:
    """The measured requests beside their simulated twins (same order), with the router's TTFT parts."""
    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1e3, 2)

    def tpot(r: Any) -> float | None:
        if r.ttft_s is None or r.e2e_s is None or r.num_output_tokens < 2:
            return None
        return (r.e2e_s - r.ttft_s) / (r.num_output_tokens - 1)

    rows = []
    for m, s in zip(measured.records, simulated.records, strict=False):
        if m.warmup:
            continue
        parts = m.server_ttft_parts_s or {}
        rows.append({"index": m.index, "sent_s": round(m.sent_s, 4), "prompt": m.num_prompt_tokens,
                     "output": m.num_output_tokens, "error": m.error_type, "ttft_ms": ms(m.ttft_s),
                     "tpot_ms": ms(tpot(m)), "sim_prompt": s.num_prompt_tokens, "sim_ttft_ms": ms(s.ttft_s),
                     "sim_tpot_ms": ms(tpot(s)),
                     "server_ttft_parts_ms": {k: ms(v) for k, v in parts.items()} or None})
    return rows


def compare(measured: RunResult, simulated: RunResult) -> dict[str, Any]:
    """Percentiles both ways and the relative error of each (simulated / measured − 1)."""
    out: dict[str, Any] = {}
    for metric in ("ttft_ms", "tpot_ms"):
        for stat, limit in TARGETS.items():
            m = float(getattr(measured.summary, metric)[stat])
            s = float(getattr(simulated.summary, metric)[stat])
            err = ratio(s, m) - 1
            out[f"{metric}_{stat}"] = {"measured": m, "simulated": s, "error": err, "limit": limit,
                                       "pass": abs(err) <= limit}
    out["attainment"] = {"measured": measured.summary.attainment, "simulated": simulated.summary.attainment}
    return out


def speed(num_requests: int) -> list[dict[str, Any]]:
    """Wall time to simulate the chat mix on 16 workers (roofline llama-3-8b on H100)."""
    arch = paper_model("llama-3-8b")
    h100 = RooflineStepModel(arch, accelerator("h100"))
    blocks = h100.num_kv_blocks(16)
    shapes = {
        "16 mixed": (PoolSpec(Role.MIXED, 16, h100, blocks),),
        "8 prefill + 8 decode": (PoolSpec(Role.PREFILL, 8, h100, blocks, link=kv_link(h100, h100)),
                                 PoolSpec(Role.DECODE, 8, h100, blocks)),
    }
    rate = 160.0  # about 10 requests/s per worker: every worker busy
    encoder = PromptEncoder("llama-3-8b", "completions", arch.vocab_size)
    specs = make_workload(WorkloadConfig(kind="chat", seed=0))
    planned = make_requests(specs, ArrivalConfig(rate=rate), encoder, arch.max_position_embeddings,
                            num_requests, None)
    rows = []
    for name, pools in shapes.items():
        config = SimConfig(pools=pools, max_model_len=arch.max_position_embeddings,
                           num_layers=arch.num_layers, kv_bytes_per_token=h100.kv_bytes_per_token)
        t0, cpu0 = time.perf_counter(), time.process_time()
        run, sim = simulate_run(config, planned, rate)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        rows.append({"deployment": name, "num_requests": num_requests, "rate_per_s": rate, "wall_s": wall,
                     "cpu_s": cpu, "load_avg_1min": os.getloadavg()[0],
                     "requests_per_wall_s": num_requests / wall, "num_steps": sim.num_steps,
                     "simulated_s": sim.end_s, "num_ok": run.summary.num_ok, "target_wall_s": 60.0,
                     "pass": wall < 60.0})
        print(f"speed: {num_requests} chat requests on {name} ({sim.num_steps} steps, {sim.end_s:.0f} s "
              f"simulated): {wall:.1f} s wall ({cpu:.1f} s CPU), {num_requests / wall:.0f} requests/s",
              flush=True)
    return rows


def s3_args(args: argparse.Namespace, rates: list[float]) -> argparse.Namespace:
    """S3's settings for a deployment that runs ``rates``: chunk size, lease, seed, SLO derivation."""
    return s3.parse_args(["--quick", "--configs", *args.configs, "--rates", *map(str, rates),
                          "--num-requests", str(args.num_requests), "--warmup-requests",
                          str(args.warmup_requests), "--stop-below", "0", "--calibration-requests", "1"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="accepted for run_all (the defaults are quick)")
    keys = ["agg", "agg2", "disagg"]
    p.add_argument("--configs", nargs="+", default=keys, choices=keys)
    p.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--num-requests", type=int, default=12)
    p.add_argument("--warmup-requests", type=int, default=1)
    p.add_argument("--speed-requests", type=int, default=10_000)
    p.add_argument("--skip-measure", action="store_true", help="profiles and speed only")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--render-only", action="store_true", help="only rewrite docs/cost.md's S8 section")
    p.add_argument("--speed-only", action="store_true", help="only redo the speed part of the result file")
    p.add_argument("--no-trace", action="store_true",
                   help="the router without --trace-responses (no per-request TTFT breakdown)")
    p.add_argument("--profile-each", choices=["run", "config", "cell"], default="cell",
                   help="when to profile: once per thread count at the start (run), right before each "
                        "configuration is launched (config), or before each configuration and rate, "
                        "each launched on its own (cell, the default)")
    p.add_argument("--reuse-profiles", action="store_true",
                   help="use the profile files an earlier run left in benchmarks/results (recorded; "
                        "implies --profile-each run)")
    args = p.parse_args(argv)
    if args.reuse_profiles:
        args.profile_each = "run"
    args.s3 = s3_args(args, args.rates)
    args.chunk_size, args.seed = args.s3.chunk_size, args.s3.seed
    return args


def units(args: argparse.Namespace) -> list[tuple[str, list[float]]]:
    """The deployments to launch, in order, each with the rates it runs: ``agg`` first (it sets the
    SLO); one per configuration, or (``--profile-each cell``) one per configuration and rate."""
    order = sorted(args.configs, key=lambda k: k != s3.REFERENCE)
    if args.profile_each == "cell":
        return [(key, [rate]) for key in order for rate in args.rates]
    return [(key, list(args.rates)) for key in order]


def profile_path(key: str, rates: list[float], threads: int, each: str) -> Path:
    """Where a unit's profile is written (``run``: the shared per-thread-count files)."""
    if each == "run":
        return RESULTS_DIR / f"s8_profile_{threads}thread.json"
    suffix = f"_{rates[0]:g}" if each == "cell" else ""
    return PROFILE_DIR / f"{key}{suffix}_{threads}thread.json"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    to_doc = args.out.resolve() == RESULTS.resolve()  # only the file of record rewrites docs/cost.md
    if args.render_only or args.speed_only:
        out = json.loads(args.out.read_text())
        if args.speed_only:
            out["speed"] = speed(args.speed_requests)
            out["speed_machine"] = machine_info()
            write_json(args.out, out)
        s8_report.write_doc(out)
        return
    machine = machine_info()
    t_start = time.perf_counter()
    print(f"S8 simulator fidelity on {machine['cpu_model']} ({machine['cpu_count']} cores), load average "
          f"{machine['load_avg_1_5_15min'][0]:.2f} (shared machine: other developers' jobs run beside)")
    profiles: dict[int, Profile] = {}
    profile_rows: dict[str, Any] = {}  # the result file's summary of every profile taken

    def record(name: str, threads: int, path: Path) -> None:
        profile_rows[name] = s8_report.profile_summary(
            profiles[threads], args.reuse_profiles, str(path.relative_to(REPO_ROOT)),
            round(time.perf_counter() - t_start, 1))

    if args.profile_each == "run":
        for t in (2, 1):
            path = profile_path("", [], t, "run")
            if args.reuse_profiles:
                profiles[t] = load_profile(path, MODEL, t)
                print(f"profile reused from {path}", flush=True)
            else:
                profiles[t] = take_profile(t, args.chunk_size, path)
            record(f"{t}_thread", t, path)
    speed_rows = speed(args.speed_requests) if args.speed_requests > 0 else []
    setups = s3.setups(args.s3)
    if not args.no_trace:  # the router's own TTFT breakdown in every answer (the bench keeps it per request)
        setups = {k: replace(v, launch=replace(v.launch,
                                               router_args=[*v.launch.router_args, "--trace-responses"]))
                  for k, v in setups.items()}
    cells: list[dict[str, Any]] = []
    slo_source: s3.SloSource = lambda s: s3.derive_slo(s, args.s3)  # noqa: E731
    plan = units(args)

    def save() -> dict[str, Any]:
        passed = {m: f"{sum(c[m]['pass'] for c in cells)}/{len(cells)}" for m in METRICS}
        out = {
            "scenario": "S8", "model": MODEL, "machine": machine,
            "settings": {k: (str(v) if isinstance(v, Path) else v)
                         for k, v in vars(args).items() if k != "s3"},
            "s3_settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args.s3).items()},
            "profiles": profile_rows, "targets": TARGETS, "cells": cells, "passed": passed,
            "speed": speed_rows, "steps": steps, "steps_by_partner": partners, "configs_done": done,
            "configs_asked": [f"{k} {r}" for k, r in plan],
            "load_avg_at_end": list(os.getloadavg()), "wall_s": time.perf_counter() - t_start,
        }
        write_json(args.out, out)
        if to_doc:
            s8_report.write_doc(json.loads(args.out.read_text()))
        return out

    done: list[str] = []
    steps: dict[str, Any] = {}  # per deployment: its workers' served steps against the profile's model
    partners: dict[str, Any] = {}  # the same split by what the other workers were doing (co-location)
    for key, rates in [] if args.skip_measure else plan:
        name, threads = (key if len(rates) > 1 else f"{key} {rates[0]:g}"), threads_of(key)
        if args.profile_each != "run":  # the profile this deployment is simulated from, minutes before it
            path = profile_path(key, rates, threads, args.profile_each)
            path.parent.mkdir(parents=True, exist_ok=True)
            profiles[threads] = take_profile(threads, args.chunk_size, path)
            record(name, threads, path)
        profile_name = name if args.profile_each != "run" else f"{threads}_thread"
        model = profiles[threads].step_model
        log_dir = Path(tempfile.mkdtemp(prefix=f"s8-steps-{key}-"))
        os.environ[STEP_LOG_ENV] = str(log_dir)  # the deployment's workers inherit it (s8_steps.py)
        try:
            bench = s3.Bench.from_args(s3_args(args, rates))
            outcome = s3.run_setup(setups[key], bench, slo_source)
        finally:
            del os.environ[STEP_LOG_ENV]
        steps[name] = s8_steps.summarize(log_dir, model)
        partners[name] = s8_steps.by_partner(log_dir, model)
        print("    steps: " + s8_steps.line(steps[name]).replace("\n", "\n    steps: "), flush=True)
        slo_source = outcome.slo
        for run, cpu in zip(outcome.runs, outcome.cpu, strict=True):
            sim_run = simulate(key, profiles, args, bench.workload, run.rate, outcome.slo)
            # the diagnostic: the same, had the simulator known the served steps' speed in this cell
            # (the speed of steps with no other worker stepping: the simulator adds co-location to it)
            window = (log_dir, model, run.start_s, run.start_s + run.wall_s)
            served, alone = s8_steps.window_speed(*window), s8_steps.window_speed(*window, alone=True)
            known = simulate(key, profiles, args, bench.workload, run.rate, outcome.slo, alone)
            at_speed = compare(run, known)
            cell = {"config": key, "rate_per_s": run.rate, "cpu": cpu, "valid": not outcome.problems,
                    "profile": profile_name,
                    # from the end of the profile to the first request of this cell
                    "profile_age_s": round(run.start_s - t_start - profile_rows[profile_name]["taken_at_s"],
                                           1),
                    **compare(run, sim_run), "served_speed": served, "served_speed_alone": alone,
                    "at_served_speed": {m: at_speed[m]["error"] for m in METRICS},
                    "requests": paired_requests(run, sim_run)}
            cells.append(cell)
            print("    " + "  ".join(f"{m} {cell[m]['measured']:.0f}→{cell[m]['simulated']:.0f} ms "
                                     f"({cell[m]['error']:+.0%})" for m in METRICS), flush=True)
        done.append(name)
        save()  # partial results survive an interrupted run
    out = save()
    print("\nwithin target (p50 ±15%, p90 ±25%): " + ", ".join(f"{m} {v}" for m, v in out["passed"].items()))
    print(f"wrote {args.out} (total {out['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
