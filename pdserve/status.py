"""``pdserve status``: a live terminal view of a running deployment.

Reads the router's ``/pdserve/workers`` (workers, roles, load, KV usage,
transfer counters, recovery) and ``/metrics`` (request counts and latency
sums, the TTFT breakdown by part), and redraws a table every ``--interval`` seconds. Rates (requests/s,
KV MB/s) are differences between two refreshes. ``--once`` prints one
snapshot and exits (scripts, tests).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Snapshot:
    """What one refresh read from the router."""

    taken_s: float
    workers: list[dict]
    recovery: dict[str, int]
    metrics: dict[str, float]
    deployment: dict | None = None  # the supervisor's view (docs/scaling.md), if any
    routing: dict | None = None
    planner: dict | None = None  # the SLO planner's history (docs/planner.md), if any


def fetch(url: str, api_key: str | None = None, timeout_s: float = 5.0) -> Snapshot:
    """Read the router's worker view and metrics."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    workers = httpx.get(f"{url}/pdserve/workers", headers=headers, timeout=timeout_s).json()
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=timeout_s).text
    metrics: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("pdserve_requests_total",):
                key = f"{sample.name}{{{sample.labels.get('outcome', '')}}}"
                metrics[key] = sample.value
            elif "part" in sample.labels:  # the TTFT breakdown, one histogram per part
                metrics[f"{sample.name}{{{sample.labels['part']}}}"] = sample.value
            elif sample.name.endswith(("_sum", "_count")) or sample.name.endswith("_total"):
                metrics[sample.name] = metrics.get(sample.name, 0.0) + sample.value
    planner = httpx.get(f"{url}/pdserve/planner", headers=headers, timeout=timeout_s)
    return Snapshot(
        time.monotonic(), workers["workers"], workers.get("recovery", {}), metrics, workers.get("deployment"),
        workers.get("routing"),
        planner.json() if planner.status_code == 200 else None,
    )


def render(now: Snapshot, before: Snapshot | None, url: str) -> str:
    """The screen for one refresh (rates need the previous snapshot)."""
    dt = now.taken_s - before.taken_s if before is not None else 0.0

    def rate(name: str) -> str:
        if before is None or dt <= 0:
            return "-"
        return f"{(now.metrics.get(name, 0.0) - before.metrics.get(name, 0.0)) / dt:.1f}"

    def mean_ms(name: str, label: str | None = None) -> str:
        key = "" if label is None else f"{{{label}}}"
        count = now.metrics.get(f"{name}_count{key}", 0.0)
        return f"{1e3 * now.metrics.get(f'{name}_sum{key}', 0.0) / count:.1f}" if count else "-"

    finished = now.metrics.get("pdserve_requests_total{finished}", 0.0)
    errors = now.metrics.get("pdserve_requests_total{error}", 0.0)
    lines = [
        f"pdserve status — {url}   {time.strftime('%H:%M:%S')}",
        f"requests: {finished:.0f} finished, {errors:.0f} errors, in flight "
        f"{now.metrics.get('pdserve_requests_inflight', 0.0):.0f}   "
        f"req/s {rate('pdserve_e2e_request_latency_seconds_count')}   "
        f"tok/s {rate('pdserve_generation_tokens_total')}   "
        f"mean TTFT {mean_ms('pdserve_time_to_first_token_seconds')} ms   "
        f"mean ITL {mean_ms('pdserve_inter_token_latency_seconds')} ms   "
        f"KV MB/s {_mb(rate('pdserve_kv_transfer_bytes_total'))}",
        "TTFT breakdown (mean ms): "
        + "   ".join(
            f"{part} {mean_ms('pdserve_ttft_breakdown_seconds', part)}"
            for part in ("queue", "prefill", "transfer", "delivery")
        ),
        "recovery: " + ", ".join(f"{k.removeprefix('num_')} {v}" for k, v in now.recovery.items()),
        _routing_line(now.routing),
        _rate_matching_line(now.workers),
        "",
        f"{'worker':<16}{'role':<9}{'state':<10}{'thr':>4}{'run':>5}{'wait':>6}{'kv%':>6}{'cached':>8}"
        f"{'held':>6}{'prompt tok':>12}{'kv sent MB':>12}{'kv recv MB':>12}"
        f"{'hit%':>6}{'index':>7}{'ev/s':>7}{'resync':>7}",
    ]
    for w in now.workers:
        stats = w.get("stats") or {}
        load = stats.get("load") or {}
        total = load.get("num_total_blocks") or 0
        used = total - load.get("num_free_blocks", total)
        state = "draining" if w.get("draining") else ("ok" if stats else "no stats")
        lines.append(
            f"{w['worker_id']:<16}{w['role']:<9}{state:<10}{w.get('threads') or '-':>4}"
            f"{load.get('num_running', 0):>5}"
            f"{load.get('num_waiting', 0) + load.get('num_waiting_for_kv', 0):>6}"
            f"{100 * used / total if total else 0:>6.1f}{load.get('num_cached_blocks', 0):>8}"
            f"{load.get('num_held', 0):>6}{stats.get('num_prompt_tokens_computed', 0):>12}"
            f"{stats.get('kv_bytes_sent', 0) / 1e6:>12.1f}{stats.get('kv_bytes_received', 0) / 1e6:>12.1f}"
            + _cache_columns(w.get("cache"))
        )
    if not now.workers:
        lines.append("(no workers registered)")
    if now.deployment and now.deployment.get("supervised"):
        lines += deployment_lines(now.deployment)
    from pdserve.planner.view import planner_lines

    lines += planner_lines(now.planner)
    return "\n".join(lines)


def deployment_lines(deployment: dict) -> list[str]:
    """Pools (ready/target) and every supervised worker: state, where it runs, restarts."""
    from pdserve.scale import pools_line

    launcher = deployment.get("launcher") or "?"
    threads = deployment.get("threads")
    lines = ["", f"pools (ready/target), {launcher} launcher: {pools_line(deployment)}   threads target: "
                 + (str(threads) if threads else "as started"),
             f"{'slot':<16}{'role':<9}{'state':<12}{'host':<14}{'node':<14}{'pid':>8}{'threads':>8}"
             f"{'restarts':>10}  note"]
    for w in deployment["workers"]:
        role = f"{w['role']}>{w['flip_to']}" if w.get("flip_to") else w["role"]
        lines.append(
            f"{w['worker_id']:<16}{role:<9}{w['state']:<12}{w['host'][:13]:<14}{w['node_id'][:12]:<14}"
            f"{w['pid']:>8}{_slot_threads(w):>8}{w['restarts']:>10}  {w['message']}"
        )
    return lines


def _slot_threads(slot: dict) -> str:
    """``2``, or ``1>2`` while a change is under way (``-``: not known)."""
    threads, to = slot.get("threads") or "-", slot.get("threads_to")
    return f"{threads}>{to}" if to else str(threads)


def _routing_line(routing: dict | None) -> str:
    """Policy, cache index and placement decisions by reason."""
    if not routing:
        return "routing: -"
    decisions = ", ".join(f"{k} {v}" for k, v in sorted(routing.get("decisions", {}).items())) or "none yet"
    return (
        f"routing: {routing.get('policy')}, disagg {routing.get('disagg_policy')}; index "
        f"{routing.get('index_blocks', 0)} blocks (+{routing.get('speculative_blocks', 0)} speculative), "
        f"resyncs {routing.get('resyncs', 0)}; placements: {decisions}"
        + (f"; moved by the load bound {routing['balanced']}" if routing.get("balanced") else "")
    )


def _rate_matching_line(workers: list[dict]) -> str:
    """Prefills held back for lack of decode room: deferred reservations and gate waits."""
    loads = [(w.get("stats") or {}).get("load") or {} for w in workers]
    deferred = sum(load.get("num_deferred_reservations", 0) for load in loads)
    waits = sum(load.get("num_gate_waits", 0) for load in loads)
    return f"rate matching: reservations deferred (decode full) {deferred}, prefill gate waits {waits}"


def _cache_columns(cache: dict | None) -> str:
    """Prefix-cache hit rate, index blocks, events/s and resyncs of one worker."""
    if not cache:
        return ""
    flag = "*" if cache.get("degraded") else ""
    return (
        f"{100 * cache.get('prefix_hit_rate', 0.0):>6.1f}{cache.get('index_blocks', 0):>7}"
        f"{cache.get('events_per_s', 0.0):>7.1f}{str(cache.get('resyncs', 0)) + flag:>7}"
    )


def _mb(rate_text: str) -> str:
    return rate_text if rate_text == "-" else f"{float(rate_text) / 1e6:.1f}"


def add_status_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``status`` to ``pdserve``'s sub-commands."""
    parser = subparsers.add_parser("status", help="live view of a running deployment")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the router's base URL")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")


def run_status(args: argparse.Namespace) -> int:
    """Draw the view until Ctrl-C (or once)."""
    api_key = os.environ.get("PDSERVE_API_KEY", "").split(",")[0].strip() or None
    before: Snapshot | None = None
    while True:
        try:
            now = fetch(args.url, api_key)
        except (httpx.HTTPError, ValueError) as exc:
            print(f"cannot read {args.url}: {exc}", file=sys.stderr)
            return 1
        screen = render(now, before, args.url)
        if args.once:
            print(screen)
            return 0
        sys.stdout.write("\x1b[H\x1b[2J" + screen + "\n")
        sys.stdout.flush()
        before = now
        time.sleep(args.interval)
