"""S7 simulated: the same phased load and SLO as ``s7_planner.py``, through ``pdserve simulate``'s
simulator (the real scheduler, router and planner in simulated time; step times from this
machine's profiles). Seconds per run, so loads and SLO rules can be explored before the measured S7.

The simulator is optimistic (benchmarks/results/s8_sim_fidelity.json: TTFT p50 20–40 % low, TPOT
p90 far too low under load): use it to rank shapes, with margins, not as S7's figures.

    python benchmarks/s7_simulate.py --load surge --slo ttft_ms=..,tpot_ms=..,ttft_per_token_ms=..,gap_ms=..
"""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, machine_info, write_json
from s7_load import SHAPES, ServiceSLO, add_load_args, phase_names, phases, resolve_load_args

from pdserve.bench.arrivals import ArrivalConfig
from pdserve.bench.workload import WorkloadConfig, make_counter, make_workload
from pdserve.sim.cli import add_simulate_parser, build_config
from pdserve.sim.deploy import PlannedRequest, PromptEncoder, make_requests
from pdserve.sim.elastic import PlannedSimulator
from pdserve.sim.planner_cli import elastic_config
from pdserve.sim.results import simulate_run
from pdserve.sim.simulator import Simulator

PROFILES = {1: RESULTS_DIR / "s8_profile_1thread.json", 2: RESULTS_DIR / "s8_profile_2thread.json"}


def sim_args(config: str, slo: ServiceSLO, args: argparse.Namespace) -> argparse.Namespace:
    """``pdserve simulate``'s options for one configuration (as s7_planner.py starts it)."""
    threads = 2 if config == "agg" else 1
    argv = [
        "simulate",
        "--model",
        "bench-50m",
        "--profile",
        str(PROFILES[threads]),
        *SHAPES[config],
        "--no-prefix-caching",
        "--chunk-size",
        "256",
        "--disagg-policy",
        args.disagg_policy,
        "--tokenizer",
        "bench-50m",
        "--seed",
        str(args.seed),
    ]
    if config == "planner":  # it chooses the workers' threads too: a profile of each count
        argv += [*planner_slo_args(slo), "--interval", str(args.interval), "--thread-profile",
                 f"2={PROFILES[2]}"]
    parser = argparse.ArgumentParser()
    add_simulate_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def planner_slo_args(slo: ServiceSLO) -> list[str]:
    """The planner's SLO options for the service SLO (as s7_planner.py passes them)."""
    out = ["--ttft-ms", str(slo.ttft_ms), "--itl-ms", str(slo.tpot_ms)]
    if slo.ttft_per_token_ms:
        out += ["--ttft-per-token-ms", str(slo.ttft_per_token_ms)]
    if slo.gap_ms is not None:
        out += ["--max-gap-ms", str(slo.gap_ms)]
    return out


def requests(args: argparse.Namespace) -> list[tuple[int, PlannedRequest]]:
    """Every phase's streams, seeded as s7_planner.py seeds them, as (phase, request) by arrival."""
    out: list[tuple[int, PlannedRequest]] = []
    encoder = PromptEncoder("bench-50m", "completions", 32000)
    counter = make_counter("bench-50m")
    for i, streams in enumerate(phases(args)):
        for j, (kind, rate) in enumerate(streams):
            seed = args.seed + i + 100 * j
            workload = make_workload(WorkloadConfig(kind=kind, seed=seed), counter)
            arrivals = ArrivalConfig(rate=rate, kind="poisson", seed=seed)
            for p in make_requests(workload, arrivals, encoder, 8192, None, args.phase_s):
                shifted = replace(p.request, arrival_s=p.request.arrival_s + i * args.phase_s)
                out.append((i, replace(p, request=shifted)))
    out.sort(key=lambda x: x[1].request.arrival_s)
    return out


def run_config(config: str, slo: ServiceSLO, args: argparse.Namespace) -> dict[str, Any]:
    """Simulate one configuration over the whole load; goodput per phase and over the run."""
    a = sim_args(config, slo, args)
    sim_config, _ = build_config(a)
    elastic = elastic_config(a, build_config)
    simulator = Simulator if elastic is None else functools.partial(PlannedSimulator, elastic=elastic)
    planned = requests(args)
    run, sim = simulate_run(sim_config, [p for _, p in planned], 0.0, slo.flat(), simulator)
    per_phase: list[dict[str, Any]] = []
    for i in range(len(phases(args))):
        recs = [r for (ph, _), r in zip(planned, run.records, strict=True) if ph == i]
        good = sum(slo.met(r) for r in recs)
        per_phase.append(
            {
                "num_requests": len(recs),
                "num_good": good,
                "attainment": round(good / len(recs), 4) if recs else None,
                "goodput_req_s": round(good / args.phase_s, 4),
            }
        )
    good = sum(p["num_good"] for p in per_phase)
    report: dict[str, Any] = {
        "phases": per_phase,
        "goodput_req_s": round(good / (args.phase_s * len(per_phase)), 4),
    }
    history = getattr(sim, "planner", None)
    if history is not None:
        report["planner_actions"] = [
            (round(d["at_unix_s"], 1), d["action"], d["shape"])
            for d in history
            if d["action"] not in ("hold", "wait")
        ]
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_load_args(p)
    p.add_argument("--configs", default="agg,agg2,disagg,planner")
    p.add_argument("--slo", required=True, help="ttft_ms=..,tpot_ms=..[,ttft_per_token_ms=..][,gap_ms=..]")
    p.add_argument("--disagg-policy", default="always", choices=["auto", "always", "never"])
    p.add_argument("--interval", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(RESULTS_DIR / "s7_simulated.json"))
    args = resolve_load_args(p.parse_args(argv))
    slo = ServiceSLO.parse(args.slo)
    configs = {c: run_config(c, slo, args) for c in args.configs.split(",")}
    names = phase_names(args)
    print(f"SIMULATED S7, load {args.load}, SLO {slo.as_dict()}")
    print("| config | " + " | ".join(names) + " | whole run |")
    for c, r in configs.items():
        cells = [f"{ph['goodput_req_s']:.3f} ({ph['attainment']:.0%})" for ph in r["phases"]]
        print(f"| {c} | " + " | ".join(cells) + f" | {r['goodput_req_s']:.3f} |")
        if "planner_actions" in r:
            print("   planner:", json.dumps(r["planner_actions"]))
    result = {
        "scenario": "S7 simulated (pdserve simulate's simulator; NOT measured)",
        "simulated": True,
        "machine": machine_info(),
        "settings": vars(args),
        "slo": slo.as_dict(),
        "phases": names,
        "configs": configs,
    }
    print(f"results written to {write_json(Path(args.output), result)}")


if __name__ == "__main__":
    main()
