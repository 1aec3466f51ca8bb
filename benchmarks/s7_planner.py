"""S7 — the SLO planner against every static shape on a phase-changing load.

The same 2-core budget serves ``bench-50m`` in each configuration, one after
the other, each started as users start it (``pdserve serve``) and driven over
HTTP by ``pdserve bench``'s load generator in this process:

  agg:     aggregated, 1 mixed worker × 2 threads;
  agg2:    aggregated, 2 mixed workers × 1 thread;
  disagg:  1 prefill + 1 decode worker × 1 thread;
  planner: ``--planner slo --max-cores 2`` (one-thread workers), started as agg2.

Workload (the same seeded requests for every configuration): ``chat`` →
``summarization`` (long prompts) → ``chat``, Poisson arrivals at
``--chat-rate`` / ``--summary-rate`` for ``--phase-s`` seconds each.

SLO: ``--slo`` or, by default, S3's derivation measured now on agg (best of
``--calibration-requests`` typical chat requests one at a time: TTFT × 10,
TPOT × 3). The planner gets the same SLO (its ITL is a request's mean gap:
the TPOT).

Per configuration and phase: SLO attainment, goodput (requests within the
SLO per second of the phase), the planner's actions (all, and after the
phase's first half: "after settling"), and the time from the phase change to
the first ``--bin-s`` bin (by arrival) whose attainment is back at 90%.
Over the run: attainment and goodput. The machine's load average is recorded
at each phase: the machine is shared; figures are only comparable side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
from common import RESULTS_DIR, machine_info, write_json

from pdserve.bench.arrivals import ArrivalConfig
from pdserve.bench.client import ClientConfig
from pdserve.bench.metrics import SLO, RequestRecord
from pdserve.bench.plots import have_matplotlib
from pdserve.bench.runner import LoadConfig, RunResult, run_load
from pdserve.bench.workload import WorkloadConfig, make_counter, make_workload
from pdserve.launch.local import free_port

MODEL = "bench-50m"
RESULTS = RESULTS_DIR / "s7_planner.json"
WORKER = ["--no-prefix-caching", "--chunk-size", "256"]
CONFIGS: dict[str, list[str]] = {
    "agg": ["--mode", "aggregated", "--mixed", "1", "--threads-per-worker", "2"],
    "agg2": ["--mode", "aggregated", "--mixed", "2", "--threads-per-worker", "1"],
    "disagg": ["--mode", "disaggregated", "--prefill", "1", "--decode", "1", "--threads-per-worker", "1"],
    "planner": [
        "--mode",
        "aggregated",
        "--mixed",
        "2",
        "--threads-per-worker",
        "1",
        "--planner",
        "slo",
        "--max-cores",
        "2",
    ],
}
PHASES = ("chat", "summarization", "chat")


def start(config: str, slo: SLO, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``pdserve serve`` for ``config``; returns once ``/v1/models`` answers 200."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "pdserve",
        "serve",
        "--model",
        args.model,
        "--port",
        str(port),
        "--ready-timeout",
        "600",
        *CONFIGS[config],
    ]
    if config == "planner":
        cmd += ["--ttft-ms", str(slo.ttft_ms), "--itl-ms", str(slo.tpot_ms), "--interval", str(args.interval)]
    cmd += ["--worker-args", *WORKER]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{config} exited: {log.read_text()[-1500:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{config} not ready in 600 s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the launcher (it drains and stops its workers); wait for it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def client(url: str, args: argparse.Namespace) -> ClientConfig:
    return ClientConfig(
        base_url=url, model=args.model, extra_body={"temperature": 0.0}, timeout_s=args.request_timeout
    )


async def calibrate(url: str, args: argparse.Namespace) -> SLO:
    """S3's derivation on agg now: typical chat request (200 in, 100 out), one at a time."""
    typical = WorkloadConfig(kind="synthetic", input_len="200", output_len="100", seed=args.seed + 1)
    load = LoadConfig(
        arrivals=ArrivalConfig(rate=math.inf),
        num_requests=args.calibration_requests,
        max_concurrency=1,
        warmup_requests=1,
        progress=False,
    )
    counter = make_counter(args.model)
    run = await run_load(client(url, args), load, make_workload(typical, counter), None, counter)
    recs = [r for r in run.records if r.ok and not r.warmup]
    ttft = min(r.ttft_s for r in recs if r.ttft_s is not None)
    tpot = min(t for r in recs if (t := r.tpot_s) is not None and t > 0)
    return SLO(ttft_ms=round(10 * ttft * 1e3, 1), tpot_ms=round(3 * tpot * 1e3, 2))


async def phase(
    url: str, kind: str, rate: float, index: int, slo: SLO, args: argparse.Namespace
) -> RunResult:
    counter = make_counter(args.model)
    workload = WorkloadConfig(kind=kind, seed=args.seed + index)
    load = LoadConfig(
        arrivals=ArrivalConfig(rate=rate, kind="poisson", seed=args.seed + index),
        duration_s=args.phase_s,
        progress=False,
    )
    return await run_load(client(url, args), load, make_workload(replace(workload), counter), slo, counter)


def recovery_s(records: list[RequestRecord], slo: SLO, bin_s: float) -> float | None:
    """Seconds from the phase start to the end of the first bin (by arrival) with attainment ≥ 90%."""
    bins: dict[int, list[bool]] = {}
    for r in records:
        bins.setdefault(int(r.scheduled_s // bin_s), []).append(slo.met(r))
    for b in sorted(bins):
        if len(bins[b]) >= 2 and sum(bins[b]) / len(bins[b]) >= 0.9:
            return round((b + 1) * bin_s, 1)
    return None


def phase_report(
    run: RunResult, slo: SLO, t0: float, t1: float, history: list[dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    s = run.summary
    acts = [
        d for d in history if t0 <= d.get("at_unix_s", 0) < t1 and d.get("action") not in ("hold", "wait")
    ]
    settled = [d for d in acts if d["at_unix_s"] >= (t0 + t1) / 2]
    return {
        "num_requests": s.num_requests,
        "num_failed": s.num_failed,
        "num_good": s.num_good,
        "attainment": round(s.attainment, 4),
        "goodput_req_s": round(s.num_good / args.phase_s, 4),
        "ttft_p90_ms": s.ttft_ms.get("p90"),
        "tpot_p90_ms": s.tpot_ms.get("p90"),
        "recovery_s": recovery_s(run.records, slo, args.bin_s),
        "planner_actions": [f"{d['action']}->{d.get('shape')}" for d in acts],
        "planner_actions_after_settling": len(settled),
        "load_avg": os.getloadavg()[0],
    }


async def run_config(config: str, slo: SLO | None, args: argparse.Namespace) -> tuple[SLO, dict[str, Any]]:
    log = Path(args.log_dir) / f"s7_{config}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    proc, url = start(config, slo or SLO(ttft_ms=1000, tpot_ms=100), args, log)
    try:
        if slo is None:
            slo = await calibrate(url, args)
            print(f"SLO (measured on {config}): TTFT {slo.ttft_ms} ms, TPOT {slo.tpot_ms} ms", flush=True)
        runs, spans = [], []
        for i, kind in enumerate(PHASES):
            rate = args.summary_rate if kind == "summarization" else args.chat_rate
            t0 = time.time()
            runs.append(await phase(url, kind, rate, i, slo, args))
            spans.append((t0, time.time()))
        view = httpx.get(f"{url}/pdserve/planner", params={"limit": 500}, timeout=10).json()
        history = view.get("history", [])
        phases = [phase_report(r, slo, a, b, history, args) for r, (a, b) in zip(runs, spans, strict=True)]
        good = sum(r.summary.num_good for r in runs)
        total = sum(r.summary.num_requests for r in runs)
        report = {
            "phases": phases,
            "attainment": round(good / total, 4) if total else None,
            "goodput_req_s": round(good / (args.phase_s * len(PHASES)), 4),
            "num_failed": sum(r.summary.num_failed for r in runs),
            "planner_history": [
                {k: d.get(k) for k in ("at_unix_s", "action", "shape", "reason", "over_capacity")}
                for d in history
            ],
            "num_shed": view.get("num_shed", 0),
        }
        if config == "planner" and history and args.plots and have_matplotlib():
            from pdserve.bench.planner_plot import plot_pools

            report["plot"] = str(plot_pools(args.plots, history, "s7_planner_pools.png"))
        return slo, report
    finally:
        stop(proc)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="agg,agg2,disagg,planner")
    p.add_argument("--model", default=MODEL, help="bench-50m (S7); tiny: a try of the script on a busy host")
    p.add_argument("--phase-s", type=float, default=180.0, help="seconds per phase")
    p.add_argument("--chat-rate", type=float, default=1.0, help="req/s in the chat phases")
    p.add_argument("--summary-rate", type=float, default=0.25, help="req/s in the summarization phase")
    p.add_argument("--slo", default=None, help="ttft_ms=...,tpot_ms=... (default: measured on agg now)")
    p.add_argument("--calibration-requests", type=int, default=3)
    p.add_argument("--interval", type=float, default=10.0, help="the planner's --interval")
    p.add_argument("--bin-s", type=float, default=15.0, help="bin of the recovery time")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default="/tmp/pdserve-s7")
    p.add_argument("--plots", default=None, help="write the planner's pool plot here")
    p.add_argument("--output", default=str(RESULTS))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.time()
    slo = SLO.parse(args.slo) if args.slo else None
    configs: dict[str, Any] = {}
    for config in args.configs.split(","):
        print(f"== {config}", flush=True)
        slo, configs[config] = asyncio.run(run_config(config, slo, args))
        print(
            json.dumps({k: v for k, v in configs[config].items() if k != "planner_history"}, indent=1),
            flush=True,
        )
    statics = {k: v for k, v in configs.items() if k != "planner"}
    best = max(statics, key=lambda k: statics[k]["goodput_req_s"]) if statics else None
    result = {
        "scenario": "S7 planner vs static shapes on a phase-changing load",
        "model": args.model,
        "machine": machine_info(),
        "settings": {k: v for k, v in vars(args).items()},
        "slo": {"ttft_ms": slo.ttft_ms if slo else None, "tpot_ms": slo.tpot_ms if slo else None},
        "phases": list(PHASES),
        "configs": configs,
        "best_static": best,
        "planner_vs_best_static_goodput": (
            round(configs["planner"]["goodput_req_s"] / statics[best]["goodput_req_s"], 3)
            if best and "planner" in configs and statics[best]["goodput_req_s"]
            else None
        ),
        "wall_s": round(time.time() - started, 1),
    }
    print(f"results written to {write_json(Path(args.output), result)}")


if __name__ == "__main__":
    main()
