"""S5's report: the PASS/MISS verdicts against the targets and the printed table.

:mod:`s5_router_overhead` measures the phases; :func:`verdicts` judges them and
:func:`print_report` prints the table, the router's TTFT split and the profile.
"""

from __future__ import annotations

from typing import Any

TARGET_TTFT_MS = 2.0
TARGET_ITL_MS = 0.5
TARGET_BENCH_RPS = 500.0

def verdicts(ph: dict[str, Any]) -> list[dict[str, Any]]:
    """PASS/MISS of each target (TTFT and ITL added by the router, errors, the bench tool's req/s)."""
    out = []
    for name, label in (("low", "1 stream"), ("c256", "256 streams")):
        if name not in ph:
            continue
        diff = ph[name]["router_minus_direct"]
        out.append(_verdict(f"router adds to TTFT p50, {label} (ms)", diff["ttft_p50_ms"], TARGET_TTFT_MS))
        # both ways: an ITL below the schedule's means tokens held back and sent in bursts
        out.append(_verdict(f"router changes ITL p50, {label} (ms)", diff["itl_p50_ms"], TARGET_ITL_MS, True))
    if "c256" in ph:
        failed = ph["c256"]["router"]["num_failed"]
        out.append(_verdict("errors at 256 streams through the router", failed, 0))
    if "max" not in ph:
        return out
    out.append(
        {
            "check": "bench tool req/s vs an instant server",
            "value": ph["max"]["direct"]["req_per_s_best"],
            "target": f"≥ {TARGET_BENCH_RPS:g}",
            "pass": ph["max"]["direct"]["req_per_s_best"] >= TARGET_BENCH_RPS,
        }
    )
    out.append(
        {
            "check": "router req/s with an instant worker",
            "value": ph["max"]["router"]["req_per_s_best"],
            "target": "(reported)",
            "pass": None,
        }
    )
    return out


def _verdict(check: str, value: float, limit: float, two_sided: bool = False) -> dict[str, Any]:
    ok = abs(value) <= limit if two_sided else value <= limit
    return {"check": check, "value": value, "target": f"{'|x| ' if two_sided else ''}≤ {limit:g}", "pass": ok}


def print_report(results: dict[str, Any]) -> None:
    """The table per phase and side, the router's TTFT split, the verdicts and the profile."""
    ph = results["phases"]
    print()
    print(
        f"{'phase':7s}{'side':8s}{'TTFT p50':>10s}{'p99':>9s}{'ITL p50':>9s}{'p99':>8s}{'late p50':>10s}"
        f"{'req/s':>8s}{'failed':>7s}  CPU cores: router worker server client"
    )
    for name, phase_result in ph.items():
        for side in ("direct", "router"):
            r = phase_result[side]
            c = r["cpu_cores"]
            print(
                f"{name:7s}{side:8s}{r['ttft_p50_ms']:10.2f}{r['ttft_p99_ms']:9.2f}{r['itl_p50_ms']:9.2f}"
                f"{r['itl_p99_ms']:8.2f}{r['token_lateness_p50_ms']:10.2f}{r['req_per_s_best']:8.1f}"
                f"{r['num_failed']:7d}  {c['router']:.2f} {c['worker']:.2f} {c['fake_server']:.2f} "
                f"{c['client']:.2f}"
            )
    split = ph["low"].get("router_ttft_split") if "low" in ph else None
    if split:
        print(
            f"\nrouter TTFT at 1 stream (first run), p50 {split['ttft_p50_ms']:.2f} ms: client → worker "
            f"{split['client_to_worker_p50_ms']:.2f} ms, in the worker {split['in_worker_p50_ms']:.2f} ms, "
            f"worker → client {split['worker_to_client_p50_ms']:.2f} ms"
        )
    if "max" in ph:
        cpu_ms = ph["max"]["router"]["cpu_ms_per_request"]["router"]
        print(f"router CPU per request, max phase: {cpu_ms:.2f} ms\n")
    for v in results["verdicts"]:
        mark = "" if v["pass"] is None else ("PASS" if v["pass"] else "MISS")
        print(f"{mark:5s} {v['check']:45s} {v['value']:10.2f}  target {v['target']}")
    prof = results.get("profile_router_max_phase")
    if prof:
        print("\nrouter profile, max phase (inclusive % of samples):")
        for func, pct in prof["inclusive_pct"]:
            print(f"  {pct:5.1f}%  {func}")
