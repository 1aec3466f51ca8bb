"""Soak test: a real deployment under steady load for minutes, watched for leaks.

Lifecycle:

1. Start a deployment (router + workers as child processes,
   :class:`LocalLauncher`) on 127.0.0.1 and wait until every worker is
   registered.
2. Load: ``--concurrency`` streams, each a loop of streaming completions
   (``ignore_eos``, so every request runs to its ``max_tokens``) with seeded
   prompt and output lengths; a quarter of the prompts share a prefix (prefix
   cache hits and evictions) and ``--abort-frac`` of the requests are dropped
   by the client after a few chunks (the disconnect path). A stream stops
   starting requests at ``--duration`` seconds or when ``--max-requests`` have
   been sent; the requests still running then get ``--stop-timeout`` seconds
   to finish and are cancelled after that.
3. Every ``--interval`` seconds, a sample: per process (router, each worker)
   RSS (and its anonymous / shared-memory parts), open file descriptors and
   threads from ``/proc``; per worker the KV blocks in use (total − free;
   prefix-cached blocks nobody uses count as free) and held for a KV transfer,
   from ``GET /pdserve/workers``; requests completed / errored / aborted and
   the throughput since the previous sample.
4. Quiesce: once the load has stopped, poll ``/pdserve/workers`` until every
   worker reports 0 blocks in use, 0 held, nothing running or waiting and the
   router 0 in flight; what is still in use after ``--idle-timeout`` seconds
   is reported as leaked. A decode worker quarantines the blocks of a request
   aborted while its KV was on the way (the prefill worker may still write
   into them) for 30 s unless the transfer ends: a client abort just before
   the stop can therefore keep a few blocks in use for most of the 30 s.
5. Report: a table with a row per sample, then per process the growth first →
   last sample and warm-up → last sample (the first ``--warmup`` seconds load
   the model's lazy state, the allocator arenas and the KV cache pages), and
   a least-squares slope over the samples under load after warm-up. Growth
   after warm-up beyond ``--rss-threshold-mib``, ``--fd-threshold`` or
   ``--thread-threshold`` is flagged SUSPECT; so are leaked blocks, errors
   and a child that exited. The exit code is 1 when anything was flagged.

    python benchmarks/soak.py [--duration 300] [--concurrency 8] [--model tiny] [--mode disaggregated]
                              [--prefill 1] [--decode 1] [--mixed 1] [--interval 5] [--warmup 15]
                              [--worker-arg=--kv-transport --worker-arg=tcp ...]

Writes ``benchmarks/results/soak.json`` (``--out`` to change it).

Prompts are text (model-agnostic); with the presets' byte tokenizer a prompt
of n characters is n + 1 tokens. RSS includes shared memory the process has
touched: a decode worker's shm KV cache grows its RSS until every block has
been used once, which is why the anonymous part is shown beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from common import RESULTS_DIR, machine_info, write_json
from soak_load import LoadCounters, load_stream
from soak_report import print_summary, print_table, summarize
from soak_sampler import Sampler, wait_idle

from pdserve.launch.local import LaunchConfig, LocalLauncher

RESULTS = RESULTS_DIR / "soak.json"


# ----------------------------------------------------------------------------- run


async def drive(launcher: LocalLauncher, args: argparse.Namespace) -> dict[str, Any]:
    """Load, sample, stop, quiesce; returns the samples, the counters and the quiesce result."""
    key = os.environ.get("PDSERVE_API_KEY", "").split(",")[0].strip()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    num_connections = args.concurrency + 8  # the streams and the sampler
    limits = httpx.Limits(max_connections=num_connections, max_keepalive_connections=num_connections)
    timeout = httpx.Timeout(args.request_timeout, connect=10.0)
    counters = LoadCounters()
    stop = asyncio.Event()
    client = httpx.AsyncClient(base_url=launcher.url, headers=headers, limits=limits, timeout=timeout)
    async with client:
        sampler = Sampler(client, launcher, counters, args)
        phase = {"now": "load"}  # the sampler calls the samples of the first --warmup seconds "warmup"
        sampling = asyncio.create_task(sampler.every(phase, stop))
        deadline = sampler.t0 + args.duration
        streams = [
            asyncio.create_task(load_stream(client, args, i, deadline, stop, counters))
            for i in range(args.concurrency)
        ]
        try:
            while time.monotonic() < deadline and not stop.is_set():
                await asyncio.sleep(min(0.5, max(deadline - time.monotonic(), 0.0)))
            phase["now"] = "stopping"
            t_stop = time.monotonic()
            _, pending = await asyncio.wait(streams, timeout=args.stop_timeout)
            for task in pending:
                task.cancel()
            counters.num_cancelled = len(pending)
            await asyncio.gather(*streams, return_exceptions=True)
            stop_s = time.monotonic() - t_stop
            phase["now"] = "quiesce"
            quiesce = await wait_idle(client, args.idle_timeout)
        finally:
            sampling.cancel()
            await asyncio.gather(sampling, return_exceptions=True)
            for task in streams:
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
        await sampler.sample("idle" if quiesce["idle"] else "leaked")
        return {
            "samples": sampler.samples, "counters": counters, "quiesce": quiesce,
            "stop_s": round(stop_s, 2), "exited": sampler.exited,
        }


# ----------------------------------------------------------------------------- report
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of load (warm-up included)")
    ap.add_argument("--concurrency", type=int, default=8, help="client streams, each one request at a time")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--mode", choices=("disaggregated", "aggregated"), default="disaggregated")
    ap.add_argument("--prefill", type=int, default=1, help="prefill workers (disaggregated)")
    ap.add_argument("--decode", type=int, default=1, help="decode workers (disaggregated)")
    ap.add_argument("--mixed", type=int, default=1, help="mixed workers (aggregated)")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--warmup", type=float, default=15.0, help="seconds before the growth baseline")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(16, 768), metavar=("MIN", "MAX"),
                    help="prompt length in characters (tokens − 1 with the byte tokenizer)")
    ap.add_argument("--output-len", type=int, nargs=2, default=(4, 128), metavar=("MIN", "MAX"))
    ap.add_argument("--abort-frac", type=float, default=0.05, help="requests the client drops mid-stream")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-requests", type=int, default=1_000_000, help="requests sent at most, all streams")
    ap.add_argument("--kv-cache-mib", type=int, default=64,
                    help="per worker; small, so that the prefix cache fills and evicts during the run")
    ap.add_argument("--worker-arg", action="append", default=[], help="extra `pdserve worker` argument")
    ap.add_argument("--request-timeout", type=float, default=60.0, help="seconds without a byte, per request")
    ap.add_argument("--stop-timeout", type=float, default=60.0, help="seconds for in-flight requests to end")
    ap.add_argument("--idle-timeout", type=float, default=30.0, help="seconds for the workers to free all KV")
    ap.add_argument("--rss-threshold-mib", type=float, default=50.0)
    ap.add_argument("--fd-threshold", type=int, default=10)
    ap.add_argument("--thread-threshold", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not 0 <= args.warmup < args.duration:
        ap.error(f"--warmup {args.warmup:g} must be in [0, --duration {args.duration:g})")
    if args.interval <= 0 or args.concurrency < 1 or args.max_requests < 1:
        ap.error("--interval, --concurrency and --max-requests must be positive")
    if not (1 <= args.prompt_len[0] <= args.prompt_len[1] and 1 <= args.output_len[0] <= args.output_len[1]):
        ap.error("--prompt-len and --output-len take MIN MAX with 1 ≤ MIN ≤ MAX")
    if not 0 <= args.abort_frac <= 1:
        ap.error("--abort-frac must be in [0, 1]")
    return args


def main() -> int:
    args = parse_args()
    worker_args = ["--model", args.model, "--kv-cache-mib", str(args.kv_cache_mib), *args.worker_arg]
    config = LaunchConfig(
        mode=args.mode, num_prefill=args.prefill, num_decode=args.decode, num_mixed=args.mixed,
        host="127.0.0.1", port=0, router_args=["--model", args.model], worker_args=worker_args,
        threads_per_worker=1, ready_timeout_s=180,
    )
    machine = machine_info()
    launcher = LocalLauncher(config)
    t_launch = time.monotonic()
    try:
        launcher.start()
        start_s = time.monotonic() - t_launch
        print(f"soak: {args.mode}, {', '.join(name for name, _ in launcher.procs)} ready in {start_s:.1f} s; "
              f"{args.concurrency} streams for {args.duration:g} s, a sample every {args.interval:g} s",
              flush=True)
        run = asyncio.run(drive(launcher, args))
    finally:
        launcher.stop()
    summary = summarize(run, args)
    print()
    print_table(run["samples"])
    print_summary(summary, args)
    config_json = {k: v for k, v in vars(args).items() if k != "out"}
    path = write_json(args.out, {
        "scenario": "soak", "machine": machine, "load_avg_at_end": list(os.getloadavg()),
        "config": config_json, "launch": asdict(config), "start_s": start_s,
        "summary": summary, "samples": run["samples"],
    })
    print(f"\nwrote {path}")
    return 1 if summary["suspects"] else 0


if __name__ == "__main__":
    sys.exit(main())
