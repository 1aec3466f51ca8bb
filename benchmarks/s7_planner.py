"""S7 — the SLO planner against every static shape on a phase-changing load.

The same 2-core budget serves ``bench-50m`` in each configuration, one after
the other, each started as users start it (``pdserve serve``) and driven over
HTTP by ``pdserve bench``'s load generator in this process:

  agg:     aggregated, 1 mixed worker × 2 threads;
  agg2:    aggregated, 2 mixed workers × 1 thread;
  disagg:  1 prefill + 1 decode worker × 1 thread;
  planner: ``--planner slo --max-cores 2`` (it chooses the workers and their threads), started as agg2.

Workload (the same seeded requests for every configuration), ``--load``
(s7_load.py): ``classic`` (S7's first run): ``chat`` → ``summarization``
(long prompts) → ``chat``, Poisson arrivals at ``--chat-rate`` /
``--summary-rate`` for ``--phase-s`` seconds each; ``surge``: ``chat`` →
chat at ``--surge-chat-rate`` plus long documents at ``--summary-rate`` →
``chat``, with a length-aware TTFT and a stall (longest gap) term in the SLO,
and ``--disagg-policy always`` for the shapes with a prefill pool.

SLO: ``--slo`` or, by default, measured now on agg (best of
``--calibration-requests`` single requests one at a time): S3's derivation
(typical chat request: TTFT × 10, TPOT × 3); ``surge`` adds 3 × the measured
prefill time per prompt token (from one long prompt) and a longest gap of
15 × the TPOT (s7_load.slo_rule). The planner gets the same SLO (its ITL is
a request's mean gap: the TPOT; ``--ttft-per-token-ms``, ``--max-gap-ms``).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from common import RESULTS_DIR, machine_info, write_json
from merge_runs import provenance
from s7_load import SHAPES, ServiceSLO, add_load_args, phase_names, phases, resolve_load_args, slo_rule
from s7_merge import MergeError, best_static, earlier

from pdserve.bench.arrivals import ArrivalConfig
from pdserve.bench.client import ClientConfig
from pdserve.bench.metrics import RequestRecord, percentile
from pdserve.bench.plots import have_matplotlib
from pdserve.bench.runner import LoadConfig, RunResult, run_load
from pdserve.bench.workload import WorkloadConfig, make_counter, make_workload
from pdserve.launch.local import free_port

MODEL = "bench-50m"
RESULTS = RESULTS_DIR / "s7_planner.json"
WORKER = ["--no-prefix-caching", "--chunk-size", "256"]
#: A long prompt of the calibration (``surge``): the summarization preset's median.
LONG_PROMPT = 1536
CHAT_PROMPT = 200


def start(
    config: str, slo: ServiceSLO, args: argparse.Namespace, log: Path
) -> tuple[subprocess.Popen[bytes], str]:
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
        *SHAPES[config],
    ]
    if config == "planner":
        cmd += ["--ttft-ms", str(slo.ttft_ms), "--itl-ms", str(slo.tpot_ms), "--interval", str(args.interval)]
        if slo.ttft_per_token_ms:
            cmd += ["--ttft-per-token-ms", str(slo.ttft_per_token_ms)]
        if slo.gap_ms is not None:
            cmd += ["--max-gap-ms", str(slo.gap_ms)]
    if args.disagg_policy and config in ("disagg", "planner"):
        cmd += ["--disagg-policy", args.disagg_policy]
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


async def single(url: str, args: argparse.Namespace, input_len: int, output_len: int) -> tuple[float, float]:
    """Best TTFT and TPOT (s) of ``--calibration-requests`` requests of these lengths, one at a time."""
    typical = WorkloadConfig(
        kind="synthetic", input_len=str(input_len), output_len=str(output_len), seed=args.seed + 1
    )
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
    return ttft, tpot


async def calibrate(url: str, args: argparse.Namespace) -> ServiceSLO:
    """The SLO rule (s7_load.slo_rule) on agg now: a typical chat request (200 in, 100 out), and for
    ``surge`` a long prompt (1,536 in, 16 out), each one at a time."""
    ttft, tpot = await single(url, args, CHAT_PROMPT, 100)
    long_ttft = (await single(url, args, LONG_PROMPT, 16))[0] if args.load == "surge" else None
    return slo_rule(ttft, tpot, long_ttft, LONG_PROMPT, CHAT_PROMPT, args.load)


@dataclass
class PhaseRun:
    """One phase's streams run together: their records (the good ones by the service SLO)."""

    records: list[RequestRecord]
    slo: ServiceSLO

    @property
    def num_good(self) -> int:
        """Requests within every term of the SLO."""
        return sum(self.slo.met(r) for r in self.records)


async def phase(url: str, index: int, slo: ServiceSLO, args: argparse.Namespace) -> PhaseRun:
    """Phase ``index``: its streams at once (stream ``j`` seeded ``seed + index + 100 j``)."""

    async def stream(j: int, kind: str, rate: float) -> RunResult:
        counter = make_counter(args.model)
        seed = args.seed + index + 100 * j
        workload = WorkloadConfig(kind=kind, seed=seed)
        load = LoadConfig(
            arrivals=ArrivalConfig(rate=rate, kind="poisson", seed=seed),
            duration_s=args.phase_s,
            progress=False,
        )
        return await run_load(client(url, args), load, make_workload(workload, counter), slo.flat(), counter)

    runs = await asyncio.gather(*(stream(j, k, r) for j, (k, r) in enumerate(phases(args)[index])))
    records = sorted((r for run in runs for r in run.records), key=lambda r: r.scheduled_s)
    return PhaseRun(records, slo)


def percentile_ms(values: list[float], q: float) -> float | None:
    """The ``q`` quantile in ms as the bench's summary computes it (linear); None when empty."""
    return round(percentile(values, 100 * q) * 1e3, 2) if values else None


def recovery_s(records: list[RequestRecord], slo: ServiceSLO, bin_s: float) -> float | None:
    """Seconds from the phase start to the end of the first bin (by arrival) with attainment ≥ 90%."""
    bins: dict[int, list[bool]] = {}
    for r in records:
        bins.setdefault(int(r.scheduled_s // bin_s), []).append(slo.met(r))
    for b in sorted(bins):
        if len(bins[b]) >= 2 and sum(bins[b]) / len(bins[b]) >= 0.9:
            return round((b + 1) * bin_s, 1)
    return None


def phase_report(
    run: PhaseRun,
    slo: ServiceSLO,
    t0: float,
    t1: float,
    history: list[dict[str, Any]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    recs = run.records
    ok = [r for r in recs if r.ok]
    good = run.num_good
    acts = [
        d for d in history if t0 <= d.get("at_unix_s", 0) < t1 and d.get("action") not in ("hold", "wait")
    ]
    settled = [d for d in acts if d["at_unix_s"] >= (t0 + t1) / 2]
    return {
        "num_requests": len(recs),
        "num_failed": len(recs) - len(ok),
        "num_good": good,
        "attainment": round(good / len(recs), 4) if recs else 0.0,
        "goodput_req_s": round(good / args.phase_s, 4),
        "ttft_p90_ms": percentile_ms([r.ttft_s for r in ok if r.ttft_s is not None], 0.9),
        "tpot_p90_ms": percentile_ms([t for r in ok if (t := r.tpot_s) is not None], 0.9),
        "max_gap_p90_ms": percentile_ms([max(r.itls_s) for r in ok if r.itls_s], 0.9),
        "recovery_s": recovery_s(run.records, slo, args.bin_s),
        "planner_actions": [f"{d['action']}->{d.get('shape')}" for d in acts],
        "planner_actions_after_settling": len(settled),
        "load_avg": os.getloadavg()[0],
    }


async def run_config(
    config: str, slo: ServiceSLO | None, args: argparse.Namespace
) -> tuple[ServiceSLO, dict[str, Any]]:
    log = Path(args.log_dir) / f"s7_{config}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    proc, url = start(config, slo or ServiceSLO(ttft_ms=1000, tpot_ms=100), args, log)
    try:
        if slo is None:
            slo = await calibrate(url, args)
            print(f"SLO (measured on {config}): {slo.as_dict()}", flush=True)
        runs, spans = [], []
        for i in range(len(phases(args))):
            t0 = time.time()
            runs.append(await phase(url, i, slo, args))
            spans.append((t0, time.time()))
        view = httpx.get(f"{url}/pdserve/planner", params={"limit": 500}, timeout=10).json()
        history = view.get("history", [])
        phases_out = [
            phase_report(r, slo, a, b, history, args) for r, (a, b) in zip(runs, spans, strict=True)
        ]
        good = sum(r.num_good for r in runs)
        total = sum(len(r.records) for r in runs)
        report = {
            "phases": phases_out,
            "attainment": round(good / total, 4) if total else None,
            "goodput_req_s": round(good / (args.phase_s * len(runs)), 4),
            "num_failed": sum(p["num_failed"] for p in phases_out),
            "planner_history": [  # with each decision's inputs and predictions (the evidence)
                {k: d.get(k) for k in ("at_unix_s", "action", "shape", "reason", "over_capacity", "inputs",
                                       "predicted", "candidates", "measured_after")}
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
    add_load_args(p)
    p.add_argument(
        "--slo",
        default=None,
        help="ttft_ms=..,tpot_ms=..[,ttft_per_token_ms=..][,gap_ms=..] (default: measured on agg now)",
    )
    p.add_argument(
        "--disagg-policy",
        default=None,
        choices=["auto", "always", "never"],
        help="for disagg and the planner (default: serve's auto for classic, always for surge: a decode "
        "worker that prefills stalls its streams)",
    )
    p.add_argument("--calibration-requests", type=int, default=3)
    p.add_argument("--interval", type=float, default=10.0, help="the planner's --interval")
    p.add_argument("--bin-s", type=float, default=15.0, help="bin of the recovery time")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default="/tmp/pdserve-s7")
    p.add_argument("--plots", default=None, help="write the planner's pool plot here")
    p.add_argument("--output", default=str(RESULTS))
    p.add_argument(
        "--merge",
        default=None,
        metavar="FILE",
        help="run only --configs; take the other configurations' rows from FILE, an earlier result of "
        "the same load and SLO (s7_merge.py); the best static shape is recomputed over the merged set",
    )
    args = resolve_load_args(p.parse_args(argv))
    if args.disagg_policy is None and args.load == "surge":
        args.disagg_policy = "always"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.time()
    slo = ServiceSLO.parse(args.slo) if args.slo else None
    merged: dict[str, Any] = {}
    if args.merge:
        try:
            slo, merged = earlier(args.merge, args, slo)
        except MergeError as exc:
            sys.exit(f"s7_planner.py: {exc}")
    configs: dict[str, Any] = {}
    for config in args.configs.split(","):
        print(f"== {config}", flush=True)
        slo, configs[config] = asyncio.run(run_config(config, slo, args))
        configs[config]["measured_in"] = provenance(machine_info())
        print(
            json.dumps({k: v for k, v in configs[config].items() if k != "planner_history"}, indent=1),
            flush=True,
        )
    configs = {**merged, **configs}
    best, ratio = best_static(configs)
    result = {
        "scenario": "S7 planner vs static shapes on a phase-changing load",
        "model": args.model,
        "machine": machine_info(),
        "settings": {k: v for k, v in vars(args).items()},
        "slo": slo.as_dict() if slo else None,
        "slo_note": "good = TTFT <= ttft_ms + ttft_per_token_ms x prompt tokens, TPOT <= tpot_ms, "
        "longest gap <= gap_ms (terms of 0/None not judged); one SLO for every phase",
        "phases": phase_names(args),
        "configs": configs,
        "best_static": best,
        "planner_vs_best_static_goodput": ratio,
        "wall_s": round(time.time() - started, 1),
    }
    print(f"results written to {write_json(Path(args.output), result)}")


if __name__ == "__main__":
    main()
