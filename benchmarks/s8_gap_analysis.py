"""Where S8's missing TTFT goes: measured vs simulated per request, from recorded runs (serves nothing).

S8's result file keeps percentiles only; S3's (``benchmarks/results/s3_goodput.json``)
keeps every measured request (send time, prompt and output tokens, TTFT, TPOT) of
the same three configurations (``agg``, ``agg2``, ``disagg``) and the same chat
mix and seed. This script:

1. simulates S3's recorded runs request for request with S8's profiles (the step
   model refitted as :mod:`s8_resimulate` does; S3's own ``--disagg-policy``,
   32 requests after 3 warm-ups per rate);
2. pairs each measured request with its simulated twin (same order, same prompt
   length: checked) and computes the TTFT and TPOT gaps (measured − simulated);
3. groups them by the number of other requests in flight when the request was
   sent (from the measured records: send time to send + TTFT + TPOT × (out − 1)),
   and fits gap = a + b · simulated TTFT per configuration and load group;
4. from S8's cells: the TTFT p50 gap per rate, and the CPU the router and the
   client used (the share of the cores that could contend with the workers);
   when the S8 run kept its requests (runs after this script was written do),
   the same per-request description of S8's own requests, and the medians of
   the router's TTFT breakdown (queue, prefill, transfer, delivery) beside the
   simulated TTFT.

Nothing is fitted into the simulator here: it only describes the gap.

    python benchmarks/s8_gap_analysis.py

Writes ``benchmarks/results/s8_gap_analysis.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import s3_goodput as s3
import s8_resimulate as rs
import s8_sim_fidelity as s8
from common import RESULTS_DIR, machine_info, write_json

from pdserve.bench.metrics import SLO
from pdserve.sim.profile import load_profile

CONFIGS = ("agg", "agg2", "disagg")
#: Load groups: other requests in flight when a request was sent.
GROUPS = ((0, 1), (2, 3), (4, 99))


def in_flight(requests: list[dict[str, Any]]) -> list[int]:
    """For each measured request, how many others were in flight when it was sent."""
    spans = [(r["sent_s"], r["sent_s"] + (r["ttft_ms"] + r["tpot_ms"] * max(r["output"] - 1, 0)) / 1e3)
             for r in requests]
    return [sum(1 for j, (a, b) in enumerate(spans) if j != i and a <= start < b)
            for i, (start, _) in enumerate(spans)]


def pair(key: str, rate_entry: dict[str, Any], profiles: dict[int, Any], args: argparse.Namespace,
         bench: s3.Bench) -> list[dict[str, float]]:
    """One S3 rate's measured requests beside their simulated twins."""
    sim = s8.simulate(key, profiles, args, bench.workload, rate_entry["rate_per_s"], SLO())
    simulated = [r for r in sim.records if not r.warmup]
    measured = rate_entry["requests"]
    if len(simulated) != len(measured):
        raise SystemExit(f"{key}: {len(measured)} measured requests, {len(simulated)} simulated")
    rows = []
    for m, s, busy in zip(measured, simulated, in_flight(measured), strict=True):
        if m["prompt"] != s.num_prompt_tokens:
            raise SystemExit(f"{key}: request lengths differ ({m['prompt']} vs {s.num_prompt_tokens})")
        if m["error"] or s.ttft_s is None or s.e2e_s is None:
            continue
        sim_tpot = (s.e2e_s - s.ttft_s) / max(s.num_output_tokens - 1, 1) * 1e3
        rows.append({"in_flight": busy, "prompt": m["prompt"], "ttft_ms": m["ttft_ms"],
                     "sim_ttft_ms": s.ttft_s * 1e3, "tpot_ms": m["tpot_ms"], "sim_tpot_ms": sim_tpot})
    return rows


def describe(rows: list[dict[str, float]]) -> dict[str, Any]:
    """Median gaps and the fit gap = a + b · simulated TTFT."""
    sim = np.array([r["sim_ttft_ms"] for r in rows])
    gap = np.array([r["ttft_ms"] - r["sim_ttft_ms"] for r in rows])
    a, b = np.linalg.lstsq(np.vstack([np.ones_like(sim), sim]).T, gap, rcond=None)[0]
    return {"num_requests": len(rows), "ttft_gap_ms_median": float(np.median(gap)),
            "ttft_ratio_median": float(np.median((gap + sim) / sim)),
            "ttft_gap_fit": {"const_ms": float(a), "per_sim_ms": float(b)},
            "tpot_gap_ms_median": statistics.median(r["tpot_ms"] - r["sim_tpot_ms"] for r in rows)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--s3", type=Path, default=RESULTS_DIR / "s3_goodput.json")
    p.add_argument("--s8", type=Path, default=s8.RESULTS)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "s8_gap_analysis.json")
    opts = p.parse_args(argv)
    s3_run, s8_run = json.loads(opts.s3.read_text()), json.loads(opts.s8.read_text())
    profiles = {t: rs.refit(load_profile(opts.s8.parent / f"s8_profile_{t}thread.json", s8.MODEL, t))[0]
                for t in (1, 2)}
    settings = s3_run["settings"]
    args = s8.parse_args(["--num-requests", str(settings["num_requests"]),
                          "--warmup-requests", str(settings["warmup_requests"])])
    args.s3.disagg_policy = settings["disagg_policy"]  # S3's router ran with it; S8's with "always"
    bench = s3.Bench.from_args(args.s3)
    per_config: dict[str, Any] = {}
    for key in CONFIGS:
        rows = [row for entry in s3_run["configs"][key]["rates"]
                for row in pair(key, entry, profiles, args, bench)]
        groups = {f"{lo}-{hi}" if hi < 99 else f"{lo}+":
                  describe([r for r in rows if lo <= r["in_flight"] <= hi]) for lo, hi in GROUPS}
        per_config[key] = {"all": describe(rows), "by_in_flight": groups}
        for name, g in [("all", per_config[key]["all"]), *groups.items()]:
            fit = g["ttft_gap_fit"]
            print(f"{key:6} in flight {name:4} n={g['num_requests']:3}: TTFT gap median "
                  f"{g['ttft_gap_ms_median']:+5.1f} ms (× {g['ttft_ratio_median']:.2f}; fit "
                  f"{fit['const_ms']:+5.1f} ms + {fit['per_sim_ms']:+.3f} × sim), TPOT gap median "
                  f"{g['tpot_gap_ms_median']:+5.1f} ms", flush=True)
    s8_cells = []
    for c in s8_run["cells"]:
        t = c["ttft_ms_p50"]
        cpu = c.get("cpu", {})
        others = cpu.get("router", 0.0) + cpu.get("client", 0.0)
        s8_cells.append({"config": c["config"], "rate_per_s": c["rate_per_s"],
                         "ttft_p50_gap_ms": t["measured"] - t["simulated"],
                         "router_and_client_cores": others})
        print(f"S8 {c['config']:6} {c['rate_per_s']:g}/s: TTFT p50 {t['measured']:.0f} vs "
              f"{t['simulated']:.0f} ms "
              f"(gap {t['measured'] - t['simulated']:+.0f} ms); router + client used {others:.3f} cores")
    s8_requests: dict[str, Any] = {}
    for key in CONFIGS:
        s8_rows: list[dict[str, Any]] = []
        for c in (c for c in s8_run["cells"] if c["config"] == key and c.get("requests")):
            keys = ("ttft_ms", "sim_ttft_ms", "tpot_ms", "sim_tpot_ms")
            ok: list[dict[str, Any]] = [r for r in c["requests"] if all(r[k] is not None for k in keys)]
            s8_rows += [{**r, "in_flight": n} for r, n in zip(ok, in_flight(ok), strict=True)]
        if not s8_rows:
            continue
        parts = [r["server_ttft_parts_ms"] for r in s8_rows if r.get("server_ttft_parts_ms")]
        s8_requests[key] = {
            "all": describe(s8_rows),
            "by_in_flight": {f"{lo}-{hi}" if hi < 99 else f"{lo}+": describe(g) for lo, hi in GROUPS
                             if (g := [r for r in s8_rows if lo <= r["in_flight"] <= hi])},
            "server_ttft_parts_ms_median": {k: statistics.median(p[k] for p in parts) for k in parts[0]}
            if parts else None,
            "sim_ttft_ms_median": statistics.median(r["sim_ttft_ms"] for r in s8_rows)}
        print(f"S8 {key} requests: {s8_requests[key]['all']}; router's TTFT parts (medians) "
              f"{s8_requests[key]['server_ttft_parts_ms_median']}")
    sources = {name: {"path": str(path), "commit": run["machine"]["git"]["commit"],
                      "date": run["machine"]["date"]}
               for name, path, run in (("s3", opts.s3, s3_run), ("s8", opts.s8, s8_run))}
    write_json(opts.out, {"scenario": "S8 gap analysis", "machine": machine_info(), "sources": sources,
                          "s3_per_request": per_config, "s8_cells": s8_cells,
                          "s8_per_request": s8_requests or None})
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
