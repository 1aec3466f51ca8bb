"""S3 — goodput under SLO: the highest Poisson request rate at which ≥ 90% of requests meet TTFT and TPOT.

The same 2 cores serve ``bench-50m`` in each configuration, one after the
other, each a real deployment (router + worker processes,
:class:`LocalLauncher`) driven over HTTP by ``pdserve bench``'s load
generator (:func:`pdserve.bench.runner.run_load`) in this process:

  agg:    aggregated, 1 mixed worker × 2 threads, chunked prefill;
  agg2:   aggregated, 2 mixed workers × 1 thread each (the router spreads the
          requests), chunked prefill;
  disagg: disaggregated, 1 prefill + 1 decode worker × 1 thread each.

The planner's chosen configuration, which BENCHMARKS.md asks for as well,
is missing: pdserve has no planner yet. The result file says so
(``planner``).

Every worker gets the same engine options: ``--chunk-size`` 256 (prompt
tokens per request per step: a long prompt shares steps with the running
decodes instead of stalling them), pdserve's default step budget, and
``--no-prefix-caching`` (every rate sends the same seeded prompts to the
same deployment: with the cache on, the second rate's prompts would be
cache hits, TTFT measured nothing). The router's worker lease is ``--lease``
60 s, as in S2 (a long step on a loaded machine outlasts the default 3 s
lease and gets a healthy worker dropped).

Lifecycle:

1. SLO. Launch ``agg`` (the machine's fastest single request: one worker
   with both cores) and time ``--calibration-requests`` requests one at a
   time (after one warm-up), each a *typical* request of the workload: prompt
   and output of the workload's median lengths (200 and 100 tokens for
   ``chat``). Their best TTFT and best TPOT are the machine's unloaded
   latencies (best of N: other jobs on this shared machine only ever add
   time; the median is recorded too). Then TTFT SLO = ``--ttft-scale`` ×
   unloaded TTFT and TPOT SLO = ``--tpot-scale`` × unloaded TPOT. Defaults:
   10× for TTFT, because prefill time grows with the prompt and the chat
   mix's p90 prompt (634 tokens) is 3.2× its median, so the SLO leaves about
   3× the p90 prompt's own prefill time for queueing (5×, a first try, was
   about 420 ms; one thread took 157 ms for the 200-token prompt, so
   prompts past ~500 tokens, some 15% of the mix, would miss it on an idle
   1-thread worker: the SLO alone would cap disagg and agg2 below 90%); 3×
   for TPOT, room for a decode batch and for prefill chunks interleaved with
   the decodes.
   ``--slo`` sets the thresholds instead. The unloaded figures, the factors
   and the thresholds go into the result.
2. Per configuration: launch it, time the same typical requests (its own
   unloaded latency, for reference), then, for each rate of ``--rates`` in
   increasing order, send ``--warmup-requests`` + ``--num-requests`` requests
   of the workload with Poisson arrivals at that rate (open loop) and wait
   for all of them; the warm-up requests (the start from an idle server) are
   not measured. Workload and arrivals are seeded: every configuration and
   every rate gets the same requests in the same order (arrival gaps scale
   with 1/rate). During each rate the CPU time of every process of the
   deployment, of this client and of the whole machine is metered: the
   difference is what *other* jobs on the shared machine took, reported
   beside each rate (a disturbed rate shows there, not just as a bad
   attainment). After two rates in a row with attainment below
   ``--stop-below`` the higher rates are skipped: they are past saturation,
   and an overloaded run is the slowest to drain (two, not one: a single
   rate can fail because another job took a core).
3. Stop the configuration; check that no process died and, for ``disagg``
   with ``--disagg-policy always`` (the default), that the decode worker
   computed no prompt tokens (else disaggregation was not in force and the
   run is marked invalid). ``--disagg-policy auto`` measures conditional
   disaggregation: the router prefills some prompts on the decode worker.

A request is *good* when it succeeded with TTFT ≤ the TTFT SLO and TPOT =
(E2E − TTFT) / (output tokens − 1) ≤ the TPOT SLO; attainment = good / all
measured requests; **goodput** = the highest rate of the sweep whose
attainment is ≥ ``--attainment-target`` (0.9). The result also gives the
goodput each configuration would have under SLOs scaled by 0.5× and 2×,
computed from the same requests (only the rates that ran: with a looser SLO
a configuration may have met a skipped higher rate, marked ``capped``).

    python benchmarks/s3_goodput.py [--quick] [--configs agg agg2 disagg] [--rates 0.5 0.75 1 1.5 2]
                                    [--num-requests 32] [--ttft-scale 10] [--tpot-scale 3]
                                    [--slo ttft_ms=..,tpot_ms=..]

The default run takes about 12–15 minutes on the 2-core machine, ``--quick``
(agg and disagg, rates 0.5 1 1.5, 24 requests per rate) about 4.

Writes ``benchmarks/results/s3_goodput.json`` and prints, per configuration
and rate, attainment, TTFT p50/p90 and TPOT p50/p90, and each goodput.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import httpx
from common import RESULTS_DIR, Setup, machine_info, ratio, write_json
from cpu_meter import CpuMeter
from merge_runs import earlier_configs, provenance
from s3_load import Bench
from s3_report import (
    PLANNER_NOTE,
    goodput_rate,
    length_spec,
    ms,
    print_rate,
    print_table,
    print_unloaded,
    rate_report,
    sensitivity,
    unloaded_report,
)
from s3_setups import MODEL, PLANNER_SERVE, setups
from serve_launcher import ServeLauncher

from pdserve.bench.metrics import SLO, Summary
from pdserve.bench.runner import RunResult
from pdserve.launch.local import LocalLauncher

RESULTS = RESULTS_DIR / "s3_goodput.json"
REFERENCE = "agg"  # the configuration whose unloaded latency sets the SLO
DEFAULTS = {"configs": ["agg", "agg2", "disagg"], "rates": [0.5, 0.75, 1.0, 1.5, 2.0], "num_requests": 32,
            "warmup_requests": 3, "calibration_requests": 5}
QUICK = {"configs": ["agg", "disagg"], "rates": [0.5, 1.0, 1.5], "num_requests": 24, "warmup_requests": 2,
         "calibration_requests": 3}


# ----------------------------------------------------------------------------- one configuration


#: The SLO, or how to derive it from the reference configuration's unloaded latency.
SloSource: TypeAlias = SLO | Callable[[Summary], SLO]


@dataclass
class Outcome:
    """What one configuration did: its unloaded latency, the SLO it was judged by, the runs per rate."""

    unloaded: Summary
    slo: SLO
    runs: list[RunResult]
    cpu: list[dict[str, float]]  # per run: cores used by each process, the machine, other processes
    skipped_rates: list[float]
    workers: dict[str, Any]
    start_s: float = 0.0
    problems: list[str] = field(default_factory=list)
    planner: dict[str, Any] | None = None  # the planner's decisions (``/pdserve/planner``)


async def drive(launcher: LocalLauncher | ServeLauncher, setup: Setup, bench: Bench, slo_source: SloSource,
                sweep: bool) -> Outcome:
    """Time the typical requests unloaded, settle the SLO, then (``sweep``) one run per rate."""
    args = bench.args
    unloaded = await bench.unloaded(launcher.url)
    print_unloaded(unloaded_report(unloaded), bench.typical_prompt_tokens, bench.typical_output_tokens)
    slo = slo_source if isinstance(slo_source, SLO) else slo_source(unloaded)
    runs: list[RunResult] = []
    cpu: list[dict[str, float]] = []
    skipped: list[float] = []
    for i, rate in enumerate(args.rates if sweep else []):
        meter = CpuMeter(launcher)
        meter.start()
        run = await bench.at_rate(launcher.url, rate, slo)
        cpu.append(meter.stop())
        runs.append(run)
        print_rate(setup.key, run, cpu[-1])
        if len(runs) >= 2 and all(r.summary.attainment < args.stop_below for r in runs[-2:]):
            skipped = args.rates[i + 1:]
            if skipped:
                print(f"    two rates in a row below {args.stop_below:.0%} attainment: rates {skipped} "
                      "skipped", flush=True)
            break
    async with httpx.AsyncClient(base_url=launcher.url, timeout=30.0) as http:
        workers = (await http.get("/pdserve/workers")).json()
        planner = (await http.get("/pdserve/planner")).json() if setup.key == "planner" else None
    return Outcome(unloaded, slo, runs, cpu, skipped, workers, planner=planner)


def run_setup(setup: Setup, bench: Bench, slo_source: SloSource, sweep: bool = True) -> Outcome:
    """Launch one configuration, drive it, stop it, and check that it ran as configured."""
    print(f"\n[{setup.key}] {setup.description}; load average {os.getloadavg()[0]:.2f}", flush=True)
    t0 = time.perf_counter()
    launcher: LocalLauncher | ServeLauncher
    if setup.key == "planner":
        assert isinstance(slo_source, SLO), "the planner runs after the SLO is settled"
        slo_args = ["--ttft-ms", f"{slo_source.ttft_ms:g}", "--itl-ms", f"{slo_source.tpot_ms:g}"]
        # (the model is a serve option: the workers get the rest of the worker arguments)
        serve_args = [*PLANNER_SERVE, *slo_args, "--worker-args", *setup.launch.worker_args[2:]]
        launcher = ServeLauncher(serve_args, bench.args.out.parent / "logs" / "s3_planner.log")
    else:
        launcher = LocalLauncher(setup.launch)
    try:
        launcher.start()
        start_s = time.perf_counter() - t0
        print(f"    ready in {start_s:.1f} s", flush=True)
        outcome = asyncio.run(drive(launcher, setup, bench, slo_source, sweep))
        exited = {name: proc.returncode for name, proc in launcher.procs if proc.poll() is not None}
    finally:
        launcher.stop()
    outcome.start_s = start_s
    outcome.problems = [f"{name} exited with code {code} during the run" for name, code in exited.items()]
    for w in outcome.workers.get("workers", []):
        stats = w.get("stats") or {}
        if (w["role"] == "decode" and stats.get("num_prompt_tokens_computed") and not bench.args.conditional
                and setup.key != "planner"):
            outcome.problems.append(f"{w['worker_id']} computed {stats['num_prompt_tokens_computed']} prompt "
                                    "tokens (a fallback: disaggregation was not in force)")
    for problem in outcome.problems:
        print(f"    INVALID RUN: {problem}", flush=True)
    return outcome


# ----------------------------------------------------------------------------- SLO


def derive_slo(reference: Summary, args: argparse.Namespace) -> SLO:
    """TTFT and TPOT thresholds: the scales × the reference configuration's best unloaded figures."""
    ttft_ms, tpot_ms = ms(reference, "ttft_ms", "min"), ms(reference, "tpot_ms", "min")
    if math.isnan(ttft_ms) or math.isnan(tpot_ms):
        sys.exit(f"the unloaded requests on {REFERENCE} failed: no SLO can be derived")
    slo = SLO(ttft_ms=round(args.ttft_scale * ttft_ms), tpot_ms=round(args.tpot_scale * tpot_ms, 1))
    print(f"    SLO: TTFT ≤ {slo.ttft_ms:g} ms ({args.ttft_scale:g} × {ttft_ms:.0f}), "
          f"TPOT ≤ {slo.tpot_ms:g} ms ({args.tpot_scale:g} × {tpot_ms:.1f})", flush=True)
    return slo


def slo_report(slo: SLO, reference: Summary | None, args: argparse.Namespace) -> dict[str, Any]:
    """The thresholds and how they were derived, for the result file."""
    if args.slo:
        how = f"given on the command line (--slo {args.slo})"
    else:
        how = (f"TTFT SLO = {args.ttft_scale:g} × unloaded TTFT, TPOT SLO = {args.tpot_scale:g} × unloaded "
               f"TPOT: the best of {args.calibration_requests} typical requests (the workload's median "
               f"prompt and output lengths) sent one at a time to {REFERENCE}, the machine's fastest single "
               "request")
    return {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "derivation": how,
            "ttft_scale": None if args.slo else args.ttft_scale,
            "tpot_scale": None if args.slo else args.tpot_scale,
            "reference_config": None if args.slo else REFERENCE,
            "reference_unloaded": None if reference is None else unloaded_report(reference)}


def planner_report(o: Outcome | None, goodput: float | None) -> dict[str, Any]:
    """The planner's configuration: its goodput and what it did (or why it was not measured)."""
    if o is None:
        return {"measured": False, "note": PLANNER_NOTE}
    history = (o.planner or {}).get("history", [])
    acted = [d for d in history if d.get("action") not in ("hold", "wait")]
    return {"measured": True, "goodput_rate_per_s": goodput, "serve_args": PLANNER_SERVE,
            "num_decisions": len(history), "actions": [f"{d['action']}->{d.get('shape')}" for d in acted],
            "final_target": history[-1].get("target") if history else None,
            "acted": [_evidence(d) for d in acted]}


def _evidence(d: dict[str, Any]) -> dict[str, Any]:
    """One planner action with what it was decided on: the load, and each candidate's prediction."""
    inputs = d.get("inputs") or {}
    return {"at_unix_s": d.get("at_unix_s"), "action": d.get("action"), "shape": d.get("shape"),
            "reason": d.get("reason"),
            "inputs": {k: inputs.get(k) for k in ("arrival_rate", "threads", "prompt_mean", "prefill_tps",
                                                  "step_s", "per_seq_s", "attainment")},
            "candidates": [{k: c.get(k) for k in ("shape", "attainment", "ttft_p90_s", "itl_s", "meets")}
                           for c in d.get("candidates") or []]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true",
                   help=f"about 4 minutes: {QUICK} (options given explicitly win)")
    p.add_argument("--configs", nargs="+", default=None, choices=["agg", "agg2", "disagg", "planner"],
                   help=f"default {DEFAULTS['configs']}")
    p.add_argument("--rates", type=float, nargs="+", default=None,
                   help=f"requests/s (default {DEFAULTS['rates']})")
    p.add_argument("--num-requests", type=int, default=None,
                   help=f"measured requests per rate (default {DEFAULTS['num_requests']})")
    p.add_argument("--warmup-requests", type=int, default=None,
                   help=f"leading requests per rate, not measured (default {DEFAULTS['warmup_requests']})")
    p.add_argument("--calibration-requests", type=int, default=None,
                   help=f"typical requests one at a time, after one warm-up "
                        f"(default {DEFAULTS['calibration_requests']})")
    p.add_argument("--workload", default="chat", choices=["chat", "synthetic"])
    p.add_argument("--input-len", default=None, help="prompt length spec (default: the workload's)")
    p.add_argument("--output-len", default=None, help="output length spec (default: the workload's)")
    p.add_argument("--ttft-scale", type=float, default=10.0, help="TTFT SLO / unloaded TTFT on agg")
    p.add_argument("--tpot-scale", type=float, default=3.0, help="TPOT SLO / unloaded TPOT on agg")
    p.add_argument("--slo", default=None, metavar="ttft_ms=..,tpot_ms=..", help="fixed SLO instead")
    p.add_argument("--attainment-target", type=float, default=0.9)
    p.add_argument("--stop-below", type=float, default=0.5,
                   help="skip the higher rates after two rates in a row with attainment below this")
    p.add_argument("--chunk-size", type=int, default=256, help="prefill chunk of every worker")
    p.add_argument("--lease", type=float, default=60.0, help="router's worker heartbeat lease, s")
    p.add_argument("--disagg-policy", default="always", choices=["always", "auto", "never"],
                   help="disagg: every prompt on the prefill worker (always), or conditional "
                        "disaggregation (auto: short or cheap prompts are prefilled on the decode worker)")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--merge", type=Path, default=None, metavar="EARLIER.json",
                   help="take the configurations not in --configs from this earlier run (same workload, "
                        "rates, requests and seed; give its SLO with --slo); each row keeps its commit")
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.rates = sorted(set(args.rates))
    args.conditional = args.disagg_policy != "always"  # the decode worker may compute prompts
    if min(args.rates) <= 0:
        p.error("--rates must be > 0")
    if args.num_requests < 1 or args.warmup_requests < 0 or args.calibration_requests < 1:
        p.error("--num-requests and --calibration-requests must be ≥ 1, --warmup-requests ≥ 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = machine_info()
    bench = Bench.from_args(args)
    prompt_spec, output_spec = (length_spec(d) for d in bench.workload.lengths())
    print(f"S3 goodput under SLO on {machine['cpu_model']} ({machine['cpu_count']} cores), torch "
          f"{machine['torch']}, commit {str(machine['git']['commit'])[:10]}, load average "
          f"{machine['load_avg_1_5_15min'][0]:.2f}")
    print(f"{MODEL}, workload {args.workload} (prompts {prompt_spec}, outputs {output_spec}), seed "
          f"{args.seed}; Poisson rates {args.rates} /s, {args.warmup_requests} + {args.num_requests} "
          f"requests per rate; configs {args.configs}")
    all_setups = setups(args)
    t_start = time.perf_counter()
    slo_source: SloSource = SLO.parse(args.slo) if args.slo else (lambda s: derive_slo(s, args))
    calibration: Outcome | None = None
    if not args.slo and REFERENCE not in args.configs:
        print(f"\n{REFERENCE} is not among --configs: launched only to time the typical requests for the SLO")
        calibration = run_setup(all_setups[REFERENCE], bench, slo_source, sweep=False)
        slo_source = calibration.slo
    outcomes: dict[str, Outcome] = {}
    for key in sorted(args.configs, key=lambda k: k != REFERENCE):  # the reference first: it sets the SLO
        outcomes[key] = run_setup(all_setups[key], bench, slo_source)
        slo_source = outcomes[key].slo
    slo = outcomes[args.configs[0]].slo
    reference = None if args.slo else (calibration or outcomes[REFERENCE]).unloaded
    slo_info = slo_report(slo, reference, args)
    results: dict[str, dict[str, Any]] = {}
    for key in args.configs:
        o, launch = outcomes[key], all_setups[key].launch
        attainment = {run.rate: run.summary.attainment for run in o.runs}
        results[key] = {
            "description": all_setups[key].description,
            "launch": {"mode": launch.mode, "num_prefill": launch.num_prefill,
                       "num_decode": launch.num_decode, "num_mixed": launch.num_mixed,
                       "threads_per_worker": launch.threads_per_worker,
                       "router_args": launch.router_args, "worker_args": launch.worker_args},
            "start_s": o.start_s, "unloaded": unloaded_report(o.unloaded),
            "goodput_rate_per_s": goodput_rate(attainment, args.attainment_target),
            "attainment": {str(k): v for k, v in attainment.items()},
            "rates": [rate_report(run, cpu) for run, cpu in zip(o.runs, o.cpu, strict=True)],
            "skipped_rates": o.skipped_rates,
            "slo_sensitivity": sensitivity(o.runs, slo, args.attainment_target),
            "valid": not o.problems, "problems": o.problems, "workers": o.workers,
            "measured_in": provenance(machine),
        }
    if args.merge:
        same = ("workload", "input_len", "output_len", "rates", "num_requests", "warmup_requests", "seed",
                "chunk_size", "attainment_target")
        results = {**earlier_configs(args.merge, vars(args), slo_info, same, set(results)), **results}
        args.configs = [k for k in ("agg", "agg2", "disagg", "planner") if k in results]
    print_table(results, slo, args.attainment_target)
    goodput = {key: res["goodput_rate_per_s"] for key, res in results.items()}
    # None where a goodput is below the sweep's lowest rate
    ratios = {f"{key}_over_{REFERENCE}": ratio(goodput[key] or math.nan, goodput[REFERENCE] or math.nan)
              for key in goodput if key != REFERENCE and REFERENCE in goodput}
    problems = [f"({key}) {p}" for key, res in results.items() for p in res["problems"]]
    out = {
        "scenario": "S3", "model": MODEL, "machine": machine,
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "command": " ".join(sys.argv)},
        "workload": {"kind": args.workload, "prompt_tokens": prompt_spec, "output_tokens": output_spec,
                     "typical_prompt_tokens": bench.typical_prompt_tokens,
                     "typical_output_tokens": bench.typical_output_tokens, "seed": args.seed},
        "slo": slo_info, "attainment_target": args.attainment_target,
        "goodput_rate_per_s": goodput, "goodput_ratios": ratios,
        "planner": planner_report(outcomes.get("planner"), goodput.get("planner")),
        "configs": results, "valid": not problems, "problems": problems,
        "load_avg_at_end": list(os.getloadavg()), "wall_s": time.perf_counter() - t_start,
    }
    if problems:
        print("\nINVALID RUNS:\n  " + "\n  ".join(problems))
    print(f"\nwrote {write_json(args.out, out)} (total {out['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
