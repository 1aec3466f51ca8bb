"""S2 — prefill/decode interference: aggregated (with and without chunked prefill) vs disaggregated.

The same machine (its 2 cores) serves ``bench-50m`` in three configurations,
one after the other, each as a real deployment (router + worker processes,
:class:`LocalLauncher`) driven over HTTP by an asyncio streaming client:

  (a) aggregated, 1 mixed worker with 2 threads, no chunked prefill (a whole
      prompt runs in one step next to the running decodes);
  (b) aggregated, 1 mixed worker with 2 threads, chunked prefill
      (``--chunk-size``, 256 by default: a long prompt is cut into chunks that
      share steps with the decodes);
  (c) disaggregated, 1 prefill + 1 decode worker with 1 thread each (the
      prefill worker keeps pdserve's default chunking; the KV moves to the
      decode worker layer by layer);
  (b1, only with ``--configs ... b1``) (b) with 1 thread: how much of the
      difference is two threads contending for the cores with the router,
      the client and whatever else runs on the machine.

The foreground rate is low (0.1/s by default): a 2048-token prefill takes
about 1.5–3 s of this CPU, so the prefill side stays well below saturation.

Settings every configuration shares, and why:

* ``--max-num-batched-tokens`` 4096 for every worker, so that a 2048-token
  prompt fits in one step beside the decodes. With pdserve's default 2048 and
  chunking off, the scheduler admits a prompt longer than the room the
  running decodes leave only when nothing else runs: the long prompt, and
  every request queued behind it, waits until the whole decode batch drains.
* the router's worker lease ``--lease`` 60 s. Workers heartbeat between
  engine steps; a 2048-token prefill step of (a) on a loaded machine takes
  longer than pdserve's default 3 s lease, the router then drops the (healthy)
  worker and fails its requests.
* ``logprobs: 0`` on every request: each SSE chunk then lists its tokens, so
  a token whose text the detokenizer holds back (half a UTF-8 character, an
  EOS generated under ``ignore_eos``: bench-50m's vocabulary has the 256 byte
  ids and the special ids among its 32000) still gets its own chunk and time.

Load, per configuration:

1. Background: 8 streams, each a loop of completions (prompt 128 token ids,
   output 256, greedy, ``ignore_eos``); a stream starts its next request when
   the last one ends. The first request of stream i asks for 32·(i+1) tokens
   so that the streams do not finish (and prefill again) in lock-step.
2. Warm-up (``--warmup`` seconds, and one long prompt served end to end): not
   measured.
3. For each ``--rates`` value: a window of ``--duration`` seconds in which
   foreground requests (prompt 2048 token ids, output 16) arrive as a Poisson
   process at that rate, then a drain: the window's foreground requests run to
   the end while the background keeps going. Arrival times and prompts are
   seeded, so every configuration sees the same requests at the same offsets.
4. Stop the background, read ``/pdserve/workers`` (KV bytes moved, prompt
   tokens each worker computed), stop the deployment.

Metrics, per configuration, rate and class: TTFT (send → first content chunk)
of the requests sent in the window, ITL (gaps between content chunks;
background: gaps that lie inside the window, foreground: every gap of the
window's requests), tokens/s of the class inside the window, and the CPU
time each process used during the window (router, workers, this client, the
rest of the machine: the machine is shared, and other jobs' load is
reported beside every figure). Prompts are token-id lists sent to
``/v1/completions`` (exact lengths; bench-50m's byte tokenizer would add a
BOS to text). Every finished request is checked: each chunk carried one
token, and there were ``usage.completion_tokens`` = ``max_tokens`` of them.
``--rounds N`` runs the configurations N times in alternating order
(a b c, c b a, ...) and pools the samples, to spread the shared machine's load
drift evenly over them.

    python benchmarks/s2_interference.py [--duration 90] [--rates 0.1 ...] [--rounds 1] [--configs a b c]
                                         [--chunk-size 256]

Writes ``benchmarks/results/s2_interference.json`` and prints a table, the
ratios (c)/(a) and (c)/(b), and PASS/MISS against the targets at the lowest
rate: background ITL p99 of (c) ≤ 0.2× (a) and ≤ 0.6× (b); foreground TTFT p50
of (c) ≤ 1.3× (b).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

import httpx
from common import RESULTS_DIR, Setup, machine_info, write_json
from cpu_meter import CpuMeter
from s2_load import MODEL, LoadGenerator, Window, collect, prompt_ids
from s2_report import compare, pool, print_table, print_window, print_workers

from pdserve.launch.local import LaunchConfig, LocalLauncher

RESULTS = RESULTS_DIR / "s2_interference.json"


# ----------------------------------------------------------------------------- configurations


def setups(args: argparse.Namespace) -> dict[str, Setup]:
    """The configurations, keyed a, b, c (and b1: (b) with one thread, to show thread contention)."""
    common = ["--model", MODEL, "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    router = ["--model", MODEL, "--lease", str(args.lease)]

    def aggregated(extra: list[str], threads: int) -> LaunchConfig:
        return LaunchConfig(mode="aggregated", num_mixed=1, port=0, router_args=router,
                            worker_args=[*common, *extra], threads_per_worker=threads, ready_timeout_s=300)

    chunked = ["--chunk-size", str(args.chunk_size)]
    return {
        "a": Setup("a", "aggregated, 1 mixed worker × 2 threads, no chunked prefill",
                   aggregated(["--no-chunked-prefill"], 2)),
        "b": Setup("b", f"aggregated, 1 mixed worker × 2 threads, chunked prefill (chunk {args.chunk_size})",
                   aggregated(chunked, 2)),
        "c": Setup("c", "disaggregated, 1 prefill + 1 decode worker × 1 thread each (prefill chunk: default)",
                   LaunchConfig(mode="disaggregated", num_prefill=1, num_decode=1, port=0, router_args=router,
                                worker_args=common, threads_per_worker=1, ready_timeout_s=300)),
        "b1": Setup("b1", f"(b) with 1 thread: aggregated, chunked (chunk {args.chunk_size}), 1 thread",
                    aggregated(chunked, 1)),
    }


# ----------------------------------------------------------------------------- one configuration


async def drive(
    launcher: LocalLauncher, args: argparse.Namespace
) -> tuple[list[Window], float, dict[str, Any]]:
    """Warm up, run one window per rate, stop the background.

    Returns the windows, the warm-up long prompt's TTFT (s) and ``/pdserve/workers``.
    """
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    timeout = httpx.Timeout(args.request_timeout, connect=10.0)
    async with httpx.AsyncClient(base_url=launcher.url, limits=limits, timeout=timeout) as client:
        gen = LoadGenerator(client, args)
        bg_tasks = [asyncio.create_task(gen.background(i)) for i in range(args.bg_streams)]
        windows = []
        try:
            t_warm = time.perf_counter()
            warm = await gen.request("fg", prompt_ids(f"{args.seed}/warmup", args.fg_prompt), args.fg_output)
            if warm.error or warm.ttft_s is None:
                raise RuntimeError(f"warm-up request failed: {warm.error}")
            print(f"    warm-up long prompt under background load: TTFT {warm.ttft_s * 1000:.0f} ms",
                  flush=True)
            await asyncio.sleep(max(t_warm + args.warmup - time.perf_counter(), 0.0))
            for w, rate in enumerate(args.rates):
                meter = CpuMeter(launcher)
                load_before = os.getloadavg()[0]
                t0 = time.perf_counter()
                meter.start()
                fg = asyncio.create_task(gen.foreground(w, rate, t0))
                await asyncio.sleep(args.duration)
                t1 = time.perf_counter()
                cpu = meter.stop()
                try:
                    await asyncio.wait_for(asyncio.shield(fg), timeout=args.drain_timeout)
                except TimeoutError:
                    print(f"    foreground requests still running {args.drain_timeout:.0f} s after the "
                          "window; cancelled", flush=True)
                    fg.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await fg
                drain_s = time.perf_counter() - t1
                window = Window(rate, collect(gen.records, w, t0, t1), cpu, drain_s, load_before)
                windows.append(window)
                print_window(window)
        finally:
            for task in bg_tasks:
                task.cancel()
            await asyncio.gather(*bg_tasks, return_exceptions=True)
        workers = (await client.get("/pdserve/workers")).json()
    return windows, warm.ttft_s, workers


def run_setup(setup: Setup, args: argparse.Namespace) -> tuple[list[Window], dict[str, Any]]:
    """Launch one configuration, drive it, stop it; returns its windows and a report of the run."""
    print(f"\n({setup.key}) {setup.description}", flush=True)
    load_start = os.getloadavg()
    t_launch = time.perf_counter()
    launcher = LocalLauncher(setup.launch)
    try:
        launcher.start()
        start_s = time.perf_counter() - t_launch
        print(f"    ready in {start_s:.1f} s; load average {load_start[0]:.2f}", flush=True)
        windows, warm_ttft_s, workers = asyncio.run(drive(launcher, args))
        exited = {name: proc.returncode for name, proc in launcher.procs if proc.poll() is not None}
    finally:
        launcher.stop()
    problems = [f"{name} exited with code {code} during the run" for name, code in exited.items()]
    for w in workers.get("workers", []):
        stats = w.get("stats") or {}
        if w["role"] == "decode" and stats.get("num_prompt_tokens_computed"):
            problems.append(f"{w['worker_id']} computed {stats['num_prompt_tokens_computed']} prompt tokens "
                            "(a fallback: disaggregation was not in force)")
    for problem in problems:
        print(f"    INVALID RUN: {problem}", flush=True)
    return windows, {
        "valid": not problems, "problems": problems,
        "start_s": start_s, "warmup_long_prompt_ttft_ms": warm_ttft_s * 1000,
        "load_avg_at_start": list(load_start), "load_avg_at_end": list(os.getloadavg()),
        "windows": [w.report() for w in windows], "workers": workers,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--duration", type=float, default=90.0,
                   help="measured seconds per configuration, rate and round")
    p.add_argument("--warmup", type=float, default=10.0, help="unmeasured seconds of background load first")
    p.add_argument("--rates", type=float, nargs="+", default=[0.1], help="foreground arrivals per second")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the configurations this many times, alternating the order (a b c, c b a, ...); "
                        "samples are pooled: spreads the shared machine's load drift over all of them")
    p.add_argument("--configs", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c", "b1"])
    p.add_argument("--chunk-size", type=int, default=256, help="prefill chunk of (b)")
    p.add_argument("--max-num-batched-tokens", type=int, default=4096,
                   help="step token budget of every worker")
    p.add_argument("--bg-streams", type=int, default=8)
    p.add_argument("--bg-prompt", type=int, default=128)
    p.add_argument("--bg-output", type=int, default=256)
    p.add_argument("--fg-prompt", type=int, default=2048)
    p.add_argument("--fg-output", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lease", type=float, default=60.0,
                   help="router's worker heartbeat lease, s (the default 3 s evicts a worker in a long step)")
    p.add_argument("--drain-timeout", type=float, default=120.0,
                   help="most seconds to wait for a window's foreground requests")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.rates = sorted(set(args.rates))
    if min(args.rates) <= 0:
        p.error("--rates must be > 0")
    if args.rounds < 1:
        p.error("--rounds must be ≥ 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = machine_info()
    print(f"S2 prefill/decode interference on {machine['cpu_model']} ({machine['cpu_count']} cores), "
          f"torch {machine['torch']}, commit {str(machine['git']['commit'])[:10]}, "
          f"load average {machine['load_avg_1_5_15min'][0]:.2f}")
    print(f"background {args.bg_streams} streams × (prompt {args.bg_prompt}, output {args.bg_output}); "
          f"foreground prompt {args.fg_prompt}, output {args.fg_output}, Poisson at {args.rates} /s; "
          f"{args.duration:g} s per window after {args.warmup:g} s warm-up; {args.rounds} round(s)")
    all_setups = setups(args)
    t_start = time.perf_counter()
    windows: dict[str, list[list[Window]]] = {key: [] for key in args.configs}
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in args.configs}
    for r in range(args.rounds):
        for key in args.configs if r % 2 == 0 else reversed(args.configs):
            run_windows, run = run_setup(all_setups[key], args)
            windows[key].append(run_windows)
            runs[key].append({"round": r, **run})
    results: dict[str, dict[str, Any]] = {}
    for key in args.configs:
        setup, c = all_setups[key], all_setups[key].launch
        results[key] = {
            "description": setup.description,
            "launch": {"mode": c.mode, "num_prefill": c.num_prefill, "num_decode": c.num_decode,
                       "num_mixed": c.num_mixed, "threads_per_worker": c.threads_per_worker,
                       "router_args": c.router_args, "worker_args": c.worker_args},
            "windows": pool(windows[key], args.rates), "runs": runs[key],
        }
    print_table(results)
    invalid = [f"({key}) round {run['round']}: {problem}"
               for key in args.configs for run in runs[key] for problem in run["problems"]]
    if invalid:
        print("\nINVALID RUNS (their figures are in the table but do not measure what they claim):\n  "
              + "\n  ".join(invalid))
    verdicts = compare(results, args.rates)
    for key in args.configs:
        print_workers(key, runs[key][-1], args.fg_prompt)
    out = {
        "scenario": "S2", "model": MODEL, "machine": machine,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "configs": results, **verdicts, "valid": not invalid, "problems": invalid,
        "load_avg_at_end": list(os.getloadavg()),
        "wall_s": time.perf_counter() - t_start,
    }
    print(f"\nwrote {write_json(args.out, out)} (total {out['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
