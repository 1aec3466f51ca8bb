"""S6 — KV-aware routing: prefix-cache reuse, TTFT and balance of each routing policy.

``bench-50m`` on this machine's 2 cores, one deployment after the other, each
a real one (router + worker processes, :class:`LocalLauncher`) driven over
HTTP by ``pdserve bench``'s load generator (:func:`run_load`, the code behind
``pdserve bench --workload shared-prefix``) with the same seeded requests and
Poisson arrivals:

  disagg-kv_aware:         3 prefill + 1 decode, kv_aware, --disagg-policy auto (the defaults)
  disagg-kv_aware-always:  3 prefill + 1 decode, kv_aware, every prompt on a prefill worker
  disagg-round_robin:      3 prefill + 1 decode, round_robin, always (the old behaviour)
  disagg-least_loaded:     3 prefill + 1 decode, least_loaded, always
  agg-kv_aware / agg-round_robin / agg-least_loaded: 3 mixed workers

Workload ``shared-prefix``: ``--num-prefixes`` system prompts of
``--prefix-len`` tokens, each with ``--users-per-prefix`` users and
``--turns`` turns (turn k repeats turns 1..k-1); every prefix equally popular
(the uniform-prefix load on which balance is judged).

Per configuration it reports: prompt tokens served from cache (the sum of the
responses' ``usage.prompt_tokens_details.cached_tokens``) against the ideal
(every distinct full block of every prompt computed once, the rest cached),
TTFT p50/p99, requests per computing worker (max/mean over the pool that
computes the prompts), KV bytes moved per request, the router's CPU seconds
per request, the placements by reason, and the cost of the KV events (bytes
and CPU per event, from the workers' counters).

Usage::

    python benchmarks/s6_kv_routing.py [--quick] [--configs disagg-kv_aware disagg-round_robin ...]

Writes ``benchmarks/results/s6_kv_routing.json``. Four or five processes on 2
shared cores are slow and noisy: request counts are modest (``--quick``: 24)
and the load average is recorded with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import time
from pathlib import Path
from typing import Any

import httpx
from common import RESULTS_DIR, machine_info, ratio, write_json
from cpu_meter import CpuMeter, cpu_seconds
from prometheus_client.parser import text_string_to_metric_families

from pdserve.bench.arrivals import ArrivalConfig
from pdserve.bench.client import ClientConfig
from pdserve.bench.runner import LoadConfig, RunResult, run_load
from pdserve.bench.workload import WorkloadConfig, make_counter, make_workload
from pdserve.block_hash import hash_blocks, num_cacheable_blocks
from pdserve.launch.local import LaunchConfig, LocalLauncher
from pdserve.tokenizer import load_tokenizer

MODEL = "bench-50m"
BLOCK_SIZE = 16
IDLE_S = 5.0  # seconds of idle router CPU measured before each run
CONFIGS: dict[str, tuple[str, str, str]] = {  # key → (mode, policy, disagg policy)
    "disagg-kv_aware": ("disaggregated", "kv_aware", "auto"),
    "disagg-kv_aware-always": ("disaggregated", "kv_aware", "always"),
    "disagg-round_robin": ("disaggregated", "round_robin", "always"),
    "disagg-least_loaded": ("disaggregated", "least_loaded", "always"),
    "agg-kv_aware": ("aggregated", "kv_aware", "auto"),
    "agg-round_robin": ("aggregated", "round_robin", "auto"),
    "agg-least_loaded": ("aggregated", "least_loaded", "auto"),
}


def launch_config(key: str, args: argparse.Namespace) -> LaunchConfig:
    mode, policy, disagg = CONFIGS[key]
    counts = {"num_prefill": 3, "num_decode": 1} if mode == "disaggregated" else {"num_mixed": 3}
    router = ["--model", MODEL, "--policy", policy, "--disagg-policy", disagg, "--lease", "60"]
    worker = ["--model", MODEL, "--block-size", str(BLOCK_SIZE), "--kv-cache-mib", str(args.kv_cache_mib)]
    return LaunchConfig(mode=mode, port=0, router_args=router, worker_args=worker, threads_per_worker=1,
                        ready_timeout_s=300, **counts)  # type: ignore[arg-type]


def ideal_cached_tokens(workload: WorkloadConfig, num_requests: int) -> tuple[int, int]:
    """(prompt tokens, tokens a perfect cache serves): every distinct full block is computed once."""
    tokenizer = load_tokenizer(MODEL)
    specs = itertools.islice(make_workload(workload, make_counter(MODEL)), num_requests)
    seen: set[int] = set()
    total = computed = 0
    for spec in specs:
        ids = tokenizer.encode(spec.prompt())
        hashes = hash_blocks(ids, BLOCK_SIZE, num_cacheable_blocks(len(ids), BLOCK_SIZE))
        new = [h for h in hashes if h not in seen]
        seen.update(new)
        total += len(ids)
        computed += len(new) * BLOCK_SIZE + len(ids) - len(hashes) * BLOCK_SIZE
    return total, total - computed


def routed_counts(metrics_text: str) -> dict[str, dict[str, float]]:
    """Attempts placed per worker, by role, from the router's /metrics."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "pdserve_routing_decisions_total":
                out.setdefault(sample.labels["role"], {})[sample.labels["worker"]] = sample.value
    return out


def balance(key: str, routed: dict[str, dict[str, float]], decisions: dict[str, int],
            workers: list[dict[str, Any]]) -> dict[str, Any]:
    """Requests per worker of the pool that computes the prompts, and max/mean over it.

    A worker of the pool that got no request counts as 0 (the router's metric
    has no sample for it).
    """
    role = "mixed" if key.startswith("agg") else "prefill"
    pool = {w["worker_id"]: 0.0 for w in workers if w.get("role") == role}
    pool.update(routed.get(role, {}))
    num_local = sum(v for k, v in decisions.items() if k.startswith("local") or k == "forced_local")
    counts = list(pool.values())
    mean = sum(counts) / len(counts) if counts else math.nan
    return {"per_worker": pool, "local_on_decode": num_local if not key.startswith("agg") else 0,
            "max_over_mean": ratio(max(counts), mean) if counts else math.nan}


async def drive(launcher: LocalLauncher, args: argparse.Namespace, workload: WorkloadConfig
                ) -> dict[str, Any]:
    client = ClientConfig(base_url=launcher.url, model=MODEL, extra_body={"temperature": 0.0},
                          timeout_s=args.request_timeout)
    load = LoadConfig(arrivals=ArrivalConfig(rate=args.rate, kind="poisson", seed=args.seed),
                      num_requests=args.num_requests, warmup_requests=0, progress=False)
    router_pid = dict(launcher.procs)["router"].pid
    idle0 = cpu_seconds(router_pid)  # what the router spends with nothing to route (heartbeats, polls)
    await asyncio.sleep(IDLE_S)
    router_idle_cores = (cpu_seconds(router_pid) - idle0) / IDLE_S
    meter = CpuMeter(launcher)
    meter.start()
    router_cpu0 = cpu_seconds(router_pid)
    run: RunResult = await run_load(client, load, make_workload(workload, make_counter(MODEL)), None,
                                    make_counter(MODEL))
    router_cpu_s = cpu_seconds(router_pid) - router_cpu0
    cpu = meter.stop()
    await asyncio.sleep(1.5)  # the last heartbeats and events
    async with httpx.AsyncClient(base_url=launcher.url, timeout=30.0) as http:
        workers = (await http.get("/pdserve/workers")).json()
        metrics_text = (await http.get("/metrics")).text
    return {"run": run, "router_cpu_s": router_cpu_s, "router_idle_cores": router_idle_cores, "cpu": cpu,
            "workers": workers,
            "routed": routed_counts(metrics_text)}


def report(key: str, out: dict[str, Any], ideal: int) -> dict[str, Any]:
    run: RunResult = out["run"]
    s = run.summary
    workers = out["workers"]
    stats = [w.get("stats") or {} for w in workers["workers"]]
    num_events = sum(st.get("kv_events", 0) for st in stats)
    decisions = workers["routing"]["decisions"]
    return {
        "requests_ok": s.num_ok, "requests_failed": s.num_failed,
        "ttft_ms": {"p50": s.ttft_ms.get("p50"), "p99": s.ttft_ms.get("p99"), "mean": s.ttft_ms.get("mean")},
        "prompt_tokens": s.num_prompt_tokens, "cached_tokens": s.num_cached_tokens,
        "ideal_cached_tokens": ideal, "cached_vs_ideal": ratio(s.num_cached_tokens, ideal),
        "balance": balance(key, out["routed"], decisions, workers["workers"]),
        "kv_bytes_per_request": ratio(workers["recovery"]["kv_bytes"], s.num_ok),
        "router_cpu_ms_per_request": ratio(1e3 * out["router_cpu_s"], s.num_requests),
        # the same less what the router spent idle over as long (at 1-1.5 req/s its idle
        # heartbeats/polls are a large part of the figure above; S5 measures the per-request cost)
        "router_idle_cores": out["router_idle_cores"],
        "router_cpu_ms_per_request_net": ratio(
            1e3 * (out["router_cpu_s"] - out["router_idle_cores"] * run.wall_s), s.num_requests
        ),
        "placements": decisions,
        "kv_events": {"events": num_events,
                      "bytes_per_event": ratio(sum(st.get("kv_event_bytes", 0) for st in stats), num_events),
                      "cpu_us_per_event": ratio(1e6 * sum(st.get("kv_event_cpu_s", 0.0) for st in stats),
                                                num_events),
                      "snapshots": sum(st.get("kv_snapshots", 0) for st in stats),
                      "resyncs": workers["routing"]["resyncs"]},
        "cpu_cores": out["cpu"], "wall_s": run.wall_s,
    }


def print_row(key: str, r: dict[str, Any]) -> None:
    print(f"  {key:<24} ok {r['requests_ok']:>3}  TTFT p50 {r['ttft_ms']['p50']:7.0f} ms  "
          f"p99 {r['ttft_ms']['p99']:7.0f} ms  cached/ideal {r['cached_vs_ideal']:.2f}  "
          f"max/mean {r['balance']['max_over_mean']:.2f}  KV {r['kv_bytes_per_request'] / 1e6:.2f} MB/req  "
          f"router {r['router_cpu_ms_per_request']:.2f} ms/req "
          f"({r['router_cpu_ms_per_request_net']:.2f} net of idle)  "
          f"{r['placements']}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--quick", action="store_true", help="24 requests per configuration")
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--rate", type=float, default=1.5, help="Poisson arrivals, requests/s")
    parser.add_argument("--num-prefixes", type=int, default=6)
    parser.add_argument("--users-per-prefix", type=int, default=2)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--prefix-len", type=int, default=384)
    parser.add_argument("--input-len", default="lognormal:48:0.5:8:160", help="tokens a user adds per turn")
    parser.add_argument("--output-len", default="16")
    parser.add_argument("--kv-cache-mib", type=int, default=256,
                        help="KV cache of each worker (bench-50m: 16 KiB a token; 160 MiB holds 10,240 "
                             "tokens): smaller than the prefixes' total puts the cache under pressure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--output", default=str(RESULTS_DIR / "s6_kv_routing.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.num_requests = 24
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workload = WorkloadConfig(kind="shared-prefix", input_len=args.input_len, output_len=args.output_len,
                              seed=args.seed, num_prefixes=args.num_prefixes,
                              users_per_prefix=args.users_per_prefix, turns=args.turns,
                              prefix_len=args.prefix_len)
    total, ideal = ideal_cached_tokens(workload, args.num_requests)
    print(f"S6: {args.num_requests} shared-prefix requests at {args.rate} req/s; {total} prompt tokens, "
          f"{ideal} cacheable at best", flush=True)
    results: dict[str, Any] = {}
    for key in args.configs:
        print(f"[{key}] load average {os.getloadavg()[0]:.2f}", flush=True)
        launcher = LocalLauncher(launch_config(key, args))
        t0 = time.perf_counter()
        try:
            launcher.start()
            out = asyncio.run(drive(launcher, args, workload))
        finally:
            launcher.stop()
        results[key] = report(key, out, ideal) | {"start_and_run_s": time.perf_counter() - t0}
        print_row(key, results[key])
    comparisons: dict[str, dict[str, float]] = {}
    for mode in ("disagg", "agg"):
        kv = results.get(f"{mode}-kv_aware")
        for base in ("round_robin", "least_loaded"):
            other = results.get(f"{mode}-{base}")
            if kv and other:
                comparisons.setdefault(mode, {}).update({
                    f"ttft_p50_vs_{base}": ratio(kv["ttft_ms"]["p50"], other["ttft_ms"]["p50"]),
                    f"ttft_p99_vs_{base}": ratio(kv["ttft_ms"]["p99"], other["ttft_ms"]["p99"])})
    print(f"comparisons: {comparisons}", flush=True)
    path = write_json(Path(args.output), {
        "scenario": "S6", "machine": machine_info(), "model": MODEL,
        "workload": {"kind": "shared-prefix", "num_requests": args.num_requests, "rate": args.rate,
                     "num_prefixes": args.num_prefixes, "users_per_prefix": args.users_per_prefix,
                     "turns": args.turns, "prefix_len": args.prefix_len, "input_len": args.input_len,
                     "output_len": args.output_len, "seed": args.seed, "prompt_tokens": total,
                     "kv_cache_mib_per_worker": args.kv_cache_mib,
                     "ideal_cached_tokens": ideal},
        "configs": {k: {"mode": CONFIGS[k][0], "policy": CONFIGS[k][1], "disagg_policy": CONFIGS[k][2]}
                    for k in args.configs},
        "results": results, "comparisons": comparisons,
        "targets": {"cached_vs_ideal": ">= 0.9", "ttft_p50_vs_round_robin": "<= 0.5",
                    "max_over_mean": "<= 1.5"},
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
