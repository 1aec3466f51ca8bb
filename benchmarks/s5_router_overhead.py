"""S5 — router overhead: what pdserve's router adds to TTFT and ITL, and how many requests/s it relays.

Two ways to reach a "worker" that emits tokens on a fixed schedule, both
measured by the same client (``pdserve.bench``) in the same run:

  direct: ``pdserve.bench.fake_server``, an OpenAI server that streams over
          HTTP on the schedule (no router);
  router: a real ``pdserve router`` (tiny preset: its byte tokenizer) with one
          fake ``mixed`` worker (this script, ``fake-worker`` mode) that
          registers over ZeroMQ, heartbeats every 0.5 s and answers each
          ``PrefillRequest`` with one ``Tokens`` message per token on the
          schedule, like an engine that produces one token per step.

The schedule of each request is written at the start of its prompt
(``[fake ttft_ms=0 itl_ms=10]``): the fake server reads it from the prompt
text, the fake worker from the prompt's byte-level token ids. Both send the
first token at once, then one every ``itl_ms`` at absolute deadlines, so
every millisecond above the schedule is transport and relaying.

Phases (direct and router alternate, ``--repeats`` times, A B A B …):

1. ``low``: one stream (``--max-concurrency 1``), 16 output tokens, 10 ms apart.
2. ``c256``: 256 concurrent streams, 8–24 tokens 100 ms apart (≈ 2,500
   tokens/s; ``--c256-itl-ms``). The first 256 requests start together and
   are not measured; the varied lengths then spread the streams' restarts,
   so the measured 768 meet a steady load, not bursts of 256 arrivals.
3. ``max``: an instant schedule (8 tokens at once), 32 streams, as many
   requests as possible: requests/s through the router; against the direct
   server it is the bench tool's own ceiling.

Reported: TTFT p50 and ITL p50 of each side and their difference
(router − direct); token lateness (how long after its scheduled time, counted
from the send, each token arrived); errors; requests/s; the CPU each process
used (router, fake worker, fake server, this client) in cores and per
request; for the router at one stream, where its TTFT goes (client → worker,
in the worker, worker → client: the fake worker logs when each request
arrived and its first token left); machine load. With ``--profile`` (py-spy
installed) the router is sampled during the ``max`` phase (``--gil``: where
its CPU goes) and its hottest functions are listed.

Targets: router adds ≤ 2 ms TTFT p50 and ≤ 0.5 ms ITL p50 (either way: an
ITL below the schedule's means tokens held back and sent in bursts); 256
streams without errors; the bench tool ≥ 500 req/s.

    python benchmarks/s5_router_overhead.py [--repeats 2] [--profile]

Every process shares the machine's cores (nothing is pinned).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS_DIR, machine_info, write_json
from s5_fake_worker import MODEL, fake_worker
from s5_report import print_report, verdicts
from s5_stack import Stack

from pdserve.bench.arrivals import ArrivalConfig
from pdserve.bench.client import ClientConfig
from pdserve.bench.runner import LoadConfig, RunResult, run_load
from pdserve.bench.workload import RequestSpec, WorkloadConfig, make_workload


@dataclass(frozen=True)
class Phase:
    """One load phase: the schedule each request asks for, its lengths and concurrency."""

    name: str
    ttft_ms: float
    itl_ms: float
    output_tokens: str  # a length spec of pdserve.bench.workload
    concurrency: int
    num_requests: int
    warmup: int


# -- measurement ----------------------------------------------------------------------------

_runs = itertools.count()
TAGS_PER_RUN = 1_000_000


def requests_for(phase: Phase, first_tag: int) -> Iterator[RequestSpec]:
    """Prompts of 32 words that open with the phase's schedule and a tag: request i has ``first_tag + i``."""
    workload = make_workload(WorkloadConfig(input_len="32", output_len=phase.output_tokens, seed=5))
    for i, spec in enumerate(workload):
        directive = f"[fake ttft_ms={phase.ttft_ms:g} itl_ms={phase.itl_ms:g} tag={first_tag + i}] "
        ((role, text),) = spec.messages
        yield replace(spec, messages=((role, directive + text),))


def run_phase(url: str, phase: Phase) -> tuple[RunResult, int]:
    """One run; returns it with the tag of its first request."""
    first_tag = next(_runs) * TAGS_PER_RUN
    client = ClientConfig(base_url=url, model=MODEL, max_connections=phase.concurrency, timeout_s=60)
    load = LoadConfig(
        arrivals=ArrivalConfig(rate=math.inf),
        num_requests=phase.num_requests,
        max_concurrency=phase.concurrency,
        warmup_requests=phase.warmup,
        progress=False,
    )
    return asyncio.run(run_load(client, load, requests_for(phase, first_tag))), first_tag


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def lateness_ms(run: RunResult, phase: Phase) -> list[float]:
    """How long after its scheduled time (from the send) each token arrived, over measured requests."""
    out: list[float] = []
    for r in run.records:
        if r.ok and not r.warmup:
            out.extend(1e3 * t - (phase.ttft_ms + j * phase.itl_ms) for j, t in enumerate(r.chunk_s))
    return out


def pooled(runs: list[RunResult], phase: Phase) -> dict[str, Any]:
    """Percentiles over every measured request of several runs, errors, req/s."""
    ok = [r for run in runs for r in run.records if r.ok and not r.warmup]
    ttfts = [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]
    itls = [t * 1e3 for r in ok for t in r.itls_s]
    late = [x for run in runs for x in lateness_ms(run, phase)]
    failures: collections.Counter[str] = collections.Counter()
    for run in runs:
        failures.update(run.summary.failures)
    return {
        "num_requests": sum(run.summary.num_requests for run in runs),
        "num_failed": sum(run.summary.num_failed for run in runs),
        "failures": dict(failures),
        "ttft_p50_ms": _p(ttfts, 50),
        "ttft_p99_ms": _p(ttfts, 99),
        "itl_p50_ms": _p(itls, 50),
        "itl_p99_ms": _p(itls, 99),
        "token_lateness_p50_ms": _p(late, 50),
        "token_lateness_p99_ms": _p(late, 99),
        "req_per_s": [run.summary.request_throughput for run in runs],
        "req_per_s_best": max(run.summary.request_throughput for run in runs),
    }


def split_ttft(run: RunResult, first_tag: int, trace_path: Path) -> dict[str, float]:
    """Router side of one run: client send → worker got the request → worker sent token → client got it."""
    seen: dict[str, tuple[float, float]] = {}
    for line in trace_path.read_text().splitlines():
        tag, received, sent = line.split()
        seen[tag] = (float(received), float(sent))
    inbound, in_worker, outbound, ttfts = [], [], [], []
    for r in run.records:
        if not r.ok or r.warmup or r.ttft_s is None:
            continue
        tag = str(first_tag + r.index)
        if tag in seen:
            received_s, sent_s = seen[tag]
            inbound.append(1e3 * (received_s - (run.start_s + r.sent_s)))
            in_worker.append(1e3 * (sent_s - received_s))
            outbound.append(1e3 * (run.start_s + r.sent_s + r.ttft_s - sent_s))
            ttfts.append(1e3 * r.ttft_s)
    return {
        "num_matched": len(inbound),
        "ttft_p50_ms": _p(ttfts, 50),
        "client_to_worker_p50_ms": _p(inbound, 50),
        "in_worker_p50_ms": _p(in_worker, 50),
        "worker_to_client_p50_ms": _p(outbound, 50),
    }


def profile_router(pid: int, duration_s: float, out: Path) -> subprocess.Popen[str] | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("--profile: py-spy is not installed (pip install py-spy); no profile")
        return None
    # --gil: only the thread holding the GIL, i.e. where the router's CPU goes (not its idle threads)
    cmd = [spy, "record", "-p", str(pid), "-d", str(math.ceil(duration_s)), "-r", "200", "--gil"]
    cmd += ["-f", "raw", "-o", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)


def summarize_profile(path: Path, top: int = 40) -> dict[str, Any]:
    """Share of samples per function (inclusive: once per stack; the frames under every stack left out)
    and per leaf."""
    inclusive: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = [re.sub(r" \((.*/)?([^/]+)\)$", r" (\2)", f) for f in stack.split(";")]
        for f in set(frames):
            inclusive[f] += n
        leaf[frames[-1]] += n

    def share(c: collections.Counter[str]) -> list[tuple[str, float]]:
        ranked = [(f, round(100 * n / total, 1)) for f, n in c.most_common() if n < 0.95 * total]
        return ranked[:top]

    return {"samples": total, "inclusive_pct": share(inclusive), "leaf_pct": share(leaf)}


def measure(stack: Stack, phases: list[Phase], repeats: int, profile: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for phase in phases:
        runs: dict[str, list[RunResult]] = {"direct": [], "router": []}
        cpu_s: dict[str, dict[str, float]] = {side: collections.defaultdict(float) for side in runs}
        wall_s: dict[str, float] = collections.defaultdict(float)
        split = None
        for rep in range(repeats):
            for side, url in (("direct", stack.direct_url), ("router", stack.router_url)):
                spy = None
                spy_path = Path(stack.logs.name) / "router.spy"
                if profile and side == "router" and phase.name == "max" and rep == 0:
                    spy = profile_router(stack.procs["router"].pid, 6, spy_path)
                stack.trace_path.write_text("")
                before = stack.cpu_s()
                run, first_tag = run_phase(url, phase)
                for name, secs in stack.cpu_s().items():
                    cpu_s[side][name] += secs - before[name]
                wall_s[side] += run.wall_s
                runs[side].append(run)
                s = run.summary
                print(
                    f"{phase.name:5s} {side:6s} #{rep}: TTFT p50 {s.ttft_ms['p50']:8.2f} ms  "
                    f"ITL p50 {s.itl_ms['p50']:6.2f} ms  {s.request_throughput:7.1f} req/s  "
                    f"failed {s.num_failed}",
                    flush=True,
                )
                if side == "router" and phase.name == "low" and rep == 0:
                    time.sleep(0.7)  # the worker flushes its trace with each heartbeat
                    split = split_ttft(run, first_tag, stack.trace_path)
                if spy is not None:
                    spy.wait(30)
                    if spy_path.exists():
                        results["profile_router_max_phase"] = summarize_profile(spy_path)
        sides = {side: pooled(r, phase) for side, r in runs.items()}
        for side, side_runs in runs.items():
            num_sent = sum(len(r.records) for r in side_runs)  # warm-up requests too
            sides[side]["cpu_ms_per_request"] = {
                k: round(1e3 * v / num_sent, 3) for k, v in cpu_s[side].items()
            }
            sides[side]["cpu_cores"] = {k: round(v / wall_s[side], 3) for k, v in cpu_s[side].items()}
        results[phase.name] = {
            "schedule": {
                "ttft_ms": phase.ttft_ms,
                "itl_ms": phase.itl_ms,
                "output_tokens": phase.output_tokens,
            },
            "concurrency": phase.concurrency,
            **sides,
            "router_minus_direct": {
                key: sides["router"][key] - sides["direct"][key]
                for key in ("ttft_p50_ms", "itl_p50_ms", "token_lateness_p50_ms")
            },
        }
        if split is not None:
            results[phase.name]["router_ttft_split"] = split
    return results

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "fake-worker"])
    parser.add_argument(
        "--router", default="tcp://127.0.0.1:5557", help="fake-worker: router control endpoint"
    )
    parser.add_argument("--worker-id", default=f"fake-mixed-{os.getpid()}")
    parser.add_argument("--trace", default=None, help="fake-worker: append per-request times to this file")
    parser.add_argument("--repeats", type=int, default=2, help="A B rounds per phase")
    parser.add_argument("--low-requests", type=int, default=40)
    parser.add_argument(
        "--c256-itl-ms", type=float, default=100.0, help="256 streams × 10 tokens/s by default"
    )
    parser.add_argument("--max-requests", type=int, default=2000)
    parser.add_argument(
        "--profile", action="store_true", help="sample the router with py-spy in the max phase"
    )
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "s5_router_overhead.json")
    parser.add_argument(
        "--router-args", default="", help='extra router options, e.g. "--event-loop asyncio --http h11"'
    )
    parser.add_argument("--phases", default="low,c256,max", help="which phases to run")
    args = parser.parse_args()
    if args.mode == "fake-worker":
        with contextlib.suppress(KeyboardInterrupt):
            fake_worker(args.router, args.worker_id, args.trace)
        return 0

    phases = [
        Phase("low", 0, 10, output_tokens="16", concurrency=1, num_requests=args.low_requests, warmup=3),
        # lengths vary so that the streams end, and restart, at different moments after the first wave
        Phase("c256", 0, args.c256_itl_ms, "uniform:8:24", concurrency=256, num_requests=768, warmup=256),
        Phase("max", 0, 0, output_tokens="8", concurrency=32, num_requests=args.max_requests, warmup=64),
    ]
    phases = [p for p in phases if p.name in args.phases.split(",")]
    load_before = os.getloadavg()
    stack = Stack(args.router_args.split())
    try:
        phase_results = measure(stack, phases, args.repeats, args.profile)
    finally:
        stack.close()
    results: dict[str, Any] = {
        "phases": {p.name: phase_results[p.name] for p in phases},
        "profile_router_max_phase": phase_results.get("profile_router_max_phase"),
        "settings": {
            "repeats": args.repeats, "model": MODEL, "phases": [p.__dict__ for p in phases],
            "router_args": args.router_args,
        },
        "machine": {**machine_info(), "load_avg_at_start": list(load_before)},
    }
    results["verdicts"] = verdicts(results["phases"])
    print_report(results)
    path = write_json(args.output, results)
    print(f"\nload average {os.getloadavg()} (at start {load_before}); written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
