"""S8 re-simulated: a finished S8 run's measured cells against the current simulator, serving nothing.

1. Read an S8 result file (``benchmarks/results/s8_sim_fidelity.json``: TTFT and
   TPOT per configuration and rate, measured and simulated) and the
   profiles that run took: each cell's own (``s8_profiles/``, runs with
   ``--profile-each cell|config``), else ``s8_profile_{1,2}thread.json``.
   ``--first-profile`` simulates every cell from the run's earliest profile of
   its thread count instead: what a profile's age costs, on the same cells.
2. Refit each profile's step model in the current form on that profile's own
   step samples (the engine timed alone, nothing served); keep its serving
   overhead if it has one.
3. Simulate the same seeded requests as S8 does (its own functions) and put
   the new simulated percentiles beside the measured ones and the run's
   simulated ones.

Nothing is fitted to the measured cells; they are only compared with. It shows
what a simulator change does to the last run's errors before a new run
(which needs a quiet machine for about 15 minutes) measures it again.

Per request (``--parts``, with an S8 file that kept its requests): the
simulated TTFT split as the router splits the measured one — queue (arrival →
the first step computing the prompt, on the prefill worker of a hand-off:
the router's work, the hand-off's set-up and waiting for a step), prefill
(→ the end of the step that sampled the first token) and the rest (delivery)
— beside the router's breakdown (queue, prefill + transfer, delivery), with
the medians per cell, so a TTFT gap can be put where it is.

A what-if: ``--what-if-request-ms agg=29,agg2=35,disagg=48`` adds that much
to each configuration's per-request overhead (before placement) — to see what a
term of that size would do, not a measured term (the output says so).

Co-location: the one-thread profile's co-location slowdown (a step while the
host's other worker computes, :mod:`pdserve.sim.colocation`) is the
recorded profile's own, or none when it predates the figure;
``--co-located-from PROFILE`` takes it from another profile (one measured
later), ``--co-located prefill=F,decode=F`` sets it. The output records
which figure was used and where it came from.

Usage::

    python benchmarks/s8_resimulate.py [--results benchmarks/results/s8_sim_fidelity.json]
                                       [--what-if-request-ms CONFIG=MS,...] [--parts] [--out FILE]
                                       [--co-located-from PROFILE | --co-located prefill=F,decode=F]

Writes ``benchmarks/results/s8_resimulated.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import s3_goodput as s3
import s8_sim_fidelity as s8
from common import REPO_ROOT, RESULTS_DIR, machine_info, ratio, write_json

from pdserve.bench.metrics import SLO
from pdserve.sim.colocation import CoLocation
from pdserve.sim.profile import Profile, load_profile
from pdserve.sim.simulator import SimResult
from pdserve.sim.step_model import StepShape, fit_linear

PARTS = ("queue", "prefill", "delivery", "ttft")
METRICS = ("ttft_ms_p50", "ttft_ms_p90", "tpot_ms_p50", "tpot_ms_p90")


def cell_profile(run: dict[str, Any], cell: dict[str, Any], co_located: CoLocation | None,
                 fits: dict[str, Any], first: bool = False) -> Profile | None:
    """The profile a cell was simulated from when the run took one per deployment (``--profile-each
    config|cell``), refitted; None for runs that used the shared per-thread-count files.

    ``first``: instead, the earliest profile of the cell's thread count in the run (what a run that
    profiled only at its start would have simulated the cell from, give or take minutes)."""
    profiles = run.get("profiles", {})
    name = cell.get("profile", "")
    if first and name in profiles:
        same = [k for k, v in profiles.items()
                if v.get("file") and s8.threads_of(k.split()[0]) == s8.threads_of(cell["config"])]
        name = min(same, key=lambda k: profiles[k].get("taken_at_s") or 0.0, default=name)
    entry = profiles.get(name)
    if not entry or not entry.get("file") or entry["file"].startswith("benchmarks/results/s8_profile_"):
        return None
    threads = s8.threads_of(cell["config"])
    own, fits[name] = refit(load_profile(REPO_ROOT / entry["file"], s8.MODEL, threads))
    return own if co_located is None or threads != 1 else replace(own, co_located=co_located)


def refit(profile: Profile) -> tuple[Profile, dict[str, Any]]:
    """The profile with its step model refitted on its own samples in the current form."""
    shapes = [StepShape(**s["shape"]) for s in profile.samples]
    fit = fit_linear(shapes, [float(s["time_s"]) for s in profile.samples])
    info = {"coefficients_s": fit.model.to_json(), "num_samples": fit.num_samples,
            "median_abs_rel_error": fit.median_abs_rel_error, "p90_abs_rel_error": fit.p90_abs_rel_error,
            "serving_overhead": profile.serving.to_json() if profile.serving else None}
    return replace(profile, step_model=fit.model), info


def ttft_parts(cell: dict[str, Any], run: Any, sim: SimResult) -> dict[str, Any]:
    """Each measured request's router TTFT parts beside the simulated twin's (ms), and the medians."""
    assert sim.steps is not None
    first_step: dict[str, float] = {}
    ends: dict[str, list[float]] = {}
    where: dict[str, str] = {}
    busy: dict[str, list[tuple[float, float]]] = {}
    for step in sim.steps:
        busy.setdefault(step.worker_id, []).append((step.start_s, step.start_s + step.duration_s))
        if step.worker_id.startswith("decode"):
            continue  # a hand-off's prompt is computed on the prefill side
        for rid, _ in step.batch:
            first_step.setdefault(rid, step.start_s)
            where.setdefault(rid, step.worker_id)
            ends.setdefault(rid, []).append(step.start_s + step.duration_s)
    rows = []
    for m, r in zip(cell["requests"], (r for r in run.records if not r.warmup), strict=True):
        p, rid = m.get("server_ttft_parts_ms"), f"sim-{r.index}"
        if not p or r.ttft_s is None or rid not in first_step:
            continue
        # the step that sampled the first token: the last of the request's steps ended by then
        end = max(t for t in ends[rid] if t <= r.sent_s + r.ttft_s + 1e-9)
        q, pre = (first_step[rid] - r.sent_s) * 1e3, (end - first_step[rid]) * 1e3
        ttft = r.ttft_s * 1e3
        a, b = first_step[rid], end
        others = sum(max(0.0, min(e, b) - max(s0, a)) for wid, spans in busy.items() if wid != where[rid]
                     for s0, e in spans)
        rows.append({"prompt": m["prompt"], "others_busy": round(others / max(b - a, 1e-9), 3),
                     "measured": {"queue": p["queue"], "prefill": p["prefill"] + p["transfer"],
                                  "delivery": p["delivery"], "ttft": m["ttft_ms"]},
                     "simulated": {"queue": round(q, 2), "prefill": round(pre, 2),
                                   "delivery": round(ttft - q - pre, 2), "ttft": round(ttft, 2)}})
    med = {side: {k: statistics.median(row[side][k] for row in rows) for k in PARTS}
           for side in ("measured", "simulated")} if rows else None
    # served prefill over simulated, when the other workers (same host) were idle or computing meanwhile
    ratios = {k: [row["measured"]["prefill"] / row["simulated"]["prefill"] for row in rows
                  if (row["others_busy"] >= 0.05) == (k == "others_busy") and row["simulated"]["prefill"] > 0]
              for k in ("others_idle", "others_busy")}
    return {"medians_ms": med, "prefill_ratio_median": {k: {"n": len(v), "median": statistics.median(v)}
                                                        for k, v in ratios.items() if v},
            "requests": rows}


def _with_extra(inner: Any, extra_s: dict[str, float], key: str, *args: Any, **kwargs: Any) -> Any:
    """``s8.sim_config`` with ``extra_s[key]`` more per-request overhead (the what-if)."""
    config = inner(key, *args, **kwargs)
    return replace(config, request_overhead_s=config.request_overhead_s + extra_s.get(key, 0.0))


def injected_co_location(path: Path | None, spec: str) -> CoLocation | None:
    """The co-location figure to use instead of the recorded profile's (None: keep the profile's)."""
    if spec:
        given = {k: float(v) for k, v in (kv.split("=") for kv in spec.split(",") if kv)}
        return CoLocation(given.get("prefill", 1.0), given.get("decode", 1.0), 1, {},
                          "given on the command line")
    if path is not None:
        co = load_profile(path, s8.MODEL, 1).co_located
        if co is None:
            raise SystemExit(f"{path} has no co-location figure")
        return co
    return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--results", type=Path, default=s8.RESULTS)
    p.add_argument("--out", type=Path, default=None,
                   help="default results/s8_resimulated.json (s8_resimulated_what_if.json with a what-if)")
    p.add_argument("--parts", action="store_true",
                   help="per request: simulated TTFT parts beside the router's (needs S8's kept requests)")
    p.add_argument("--what-if-request-ms", default="",
                   help="CONFIG=MS,... added to each configuration's per-request overhead (a what-if)")
    p.add_argument("--first-profile", action="store_true",
                   help="simulate each cell from the run's earliest profile of its thread count instead "
                        "of its own (runs with --profile-each cell|config): what the profile's age costs")
    p.add_argument("--co-located-from", type=Path, default=None,
                   help="a profile whose co-location figure replaces the one-thread profile's")
    p.add_argument("--co-located", default="",
                   help="prefill=F,decode=F: the one-thread profile's co-location slowdown (overrides)")
    args = p.parse_args(argv)
    co_located = injected_co_location(args.co_located_from, args.co_located)
    pairs = (kv.split("=") for kv in args.what_if_request_ms.split(",") if kv)
    what_if = {k: float(v) / 1e3 for k, v in pairs}
    if args.out is None:
        args.out = RESULTS_DIR / ("s8_resimulated_what_if.json" if what_if else
                                  "s8_resimulated_coloc.json" if co_located else
                                  "s8_resimulated_first_profile.json" if args.first_profile else
                                  "s8_resimulated.json")
    if what_if:
        s8.sim_config = partial(_with_extra, s8.sim_config, what_if)
    run = json.loads(args.results.read_text())
    profiles: dict[int, Profile] = {}
    fits: dict[str, Any] = {}
    for threads in (1, 2):
        path = args.results.parent / f"s8_profile_{threads}thread.json"
        if not path.exists():  # a result file kept elsewhere: the profiles of record
            path = RESULTS_DIR / path.name
        profiles[threads], fits[f"{threads}_thread"] = refit(load_profile(path, s8.MODEL, threads))
    if co_located is not None:  # the one-thread workers' (agg2, disagg); agg has one worker: nothing to slow
        profiles[1] = replace(profiles[1], co_located=co_located)
    fits["co_located_1_thread"] = profiles[1].co_location.to_json()
    print(f"co-location (one-thread workers): prefill ×{profiles[1].co_location.prefill:.3f}, "
          f"decode ×{profiles[1].co_location.decode:.3f}"
          + (f" (from {args.co_located_from or 'the command line'})" if co_located else ""), flush=True)
    settings = run["settings"]
    s8_args = s8.parse_args(["--num-requests", str(settings["num_requests"]),
                             "--warmup-requests", str(settings["warmup_requests"])])
    bench = s3.Bench.from_args(s8_args.s3)
    cells = []
    for cell in run["cells"]:
        own = cell_profile(run, cell, co_located, fits, args.first_profile)
        cell_profiles = profiles if own is None else {**profiles, s8.threads_of(cell["config"]): own}
        sim, result = s8.simulate_steps(cell["config"], cell_profiles, s8_args, bench.workload,
                                        cell["rate_per_s"], SLO(), record_steps=args.parts)
        row: dict[str, Any] = {"config": cell["config"], "rate_per_s": cell["rate_per_s"]}
        if args.parts and cell.get("requests"):
            row["ttft_parts"] = ttft_parts(cell, sim, result)
            med = row["ttft_parts"]["medians_ms"]
            if med:
                print(f"{row['config']} {row['rate_per_s']:g}/s TTFT parts, medians (ms), measured | "
                      "simulated: " + "  ".join(f"{k} {med['measured'][k]:.1f} | {med['simulated'][k]:.1f}"
                                                for k in PARTS)
                      + "; served/simulated prefill, median: " + ", ".join(
                          f"{k.replace('_', ' ')} {v['median']:.2f} (n={v['n']})"
                          for k, v in row["ttft_parts"]["prefill_ratio_median"].items()), flush=True)
        for metric in METRICS:
            name, stat = metric.rsplit("_", 1)
            measured, before = cell[metric]["measured"], cell[metric]["simulated"]
            now = float(getattr(sim.summary, name)[stat])
            limit = s8.TARGETS[stat]
            row[metric] = {"measured": measured, "simulated_in_run": before, "simulated_now": now,
                           "error_in_run": ratio(before, measured) - 1, "error_now": ratio(now, measured) - 1,
                           "pass_now": abs(ratio(now, measured) - 1) <= limit}
        cells.append(row)
        print(f"{row['config']} {row['rate_per_s']:g}/s: " + "  ".join(
            f"{m} {r['measured']:.0f}: {r['simulated_in_run']:.0f} ({r['error_in_run']:+.0%}) → "
            f"{r['simulated_now']:.0f} ({r['error_now']:+.0%})" for m, r in ((m, row[m]) for m in METRICS)),
            flush=True)
    passed = {m: f"{sum(c[m]['pass_now'] for c in cells)}/{len(cells)}" for m in METRICS}
    print("within target now (p50 ±15%, p90 ±25%): " + ", ".join(f"{m} {v}" for m, v in passed.items()))
    write_json(args.out, {"scenario": "S8 re-simulated", "machine": machine_info(),
                          "source": {"results": str(args.results), "date": run["machine"]["date"],
                                     "commit": run["machine"]["git"]["commit"]},
                          "refits": fits, "cells": cells, "passed_now": passed,
                          "first_profile": args.first_profile,
                          "what_if_request_ms": {k: v * 1e3 for k, v in what_if.items()} or None,
                          "co_located_injected": None if co_located is None else {
                              "from": str(args.co_located_from or "--co-located " + args.co_located),
                              **co_located.to_json()}})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
