"""S14 — what the live dashboard costs the router, what the page weighs, how fast it shows a lost worker.

The stack of S5 (``s5_router_overhead.py``): a real ``pdserve router`` with
fake ``mixed`` workers that stream tokens on a schedule, so that the router's
own CPU is what is measured. The dashboard is "open" when a headless
Chromium (system package, driven by selenium) shows ``/dashboard``, polling
its data once a second, exactly as a user's browser would.

1. Router CPU per request, dashboard open vs none, alternating (A B A B ...,
   ``--repeats``): S5's ``max`` phase (instant tokens, 32 streams) and its
   ``low`` phase (one stream, 16 tokens 10 ms apart: TTFT and ITL p50).
   The router samples for the dashboard in both: its ring buffer runs
   whether a page is open or not.
2. Idle: router CPU with no traffic, for ``--idle-s`` seconds each, open vs none.
3. Page weight: the page (one HTML document, CSS and JS inlined), the first
   data answer, and an average refresh.
4. Kill → shown: a fake worker SIGKILLed, and the time until the open page
   draws it as ``lost`` (DOM polled every 20 ms), ``--kills`` times.

    python benchmarks/s14_dashboard.py [--repeats 3] [--kills 5]

Every process shares the machine's cores (nothing is pinned); Chromium
itself runs on them too while the dashboard is open.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from common import RESULTS_DIR, machine_info, write_json
from s5_router_overhead import Phase, Stack, run_phase

HERE = Path(__file__).resolve()


def open_dashboard(url: str) -> Any:
    """A headless Chromium showing the dashboard (selenium; the system's chromium and chromedriver)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        raise SystemExit("needs the system packages chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1500,2000"):
        options.add_argument(arg)
    browser = webdriver.Chrome(options=options, service=Service(driver))
    browser.get(f"{url}/dashboard")
    deadline = time.monotonic() + 60
    while int(browser.execute_script("return Number(document.body.dataset.updates)") or 0) < 2:
        if time.monotonic() > deadline:
            raise RuntimeError("the dashboard did not draw within 60 s")
        time.sleep(0.1)
    return browser


def router_cpu_s(stack: Stack) -> float:
    return stack.cpu_s()["router"]


def cpu_per_request(stack: Stack, phase: Phase, repeats: int, browser_url: str) -> dict[str, Any]:
    """Router CPU ms per request and latency p50s, dashboard open vs none, alternating."""
    sides: dict[str, dict[str, list[float]]] = {
        s: {"cpu_ms_per_request": [], "req_s": [], "ttft_p50_ms": [], "itl_p50_ms": [], "failed": []}
        for s in ("none", "open")
    }
    for rep in range(repeats):
        for side in ("none", "open"):
            browser = open_dashboard(browser_url) if side == "open" else None
            try:
                before = router_cpu_s(stack)
                run, _ = run_phase(stack.router_url, phase)
                used_s = router_cpu_s(stack) - before
            finally:
                if browser is not None:
                    browser.quit()
            s = run.summary
            row = sides[side]
            row["cpu_ms_per_request"].append(1e3 * used_s / len(run.records))
            row["req_s"].append(s.request_throughput)
            row["ttft_p50_ms"].append(s.ttft_ms["p50"])
            row["itl_p50_ms"].append(s.itl_ms["p50"])
            row["failed"].append(s.num_failed)
            cpu_ms = row["cpu_ms_per_request"][-1]
            print(
                f"{phase.name:4s} {side:4s} #{rep}: router {cpu_ms:.3f} ms CPU/request, "
                f"{s.request_throughput:.0f} req/s, TTFT p50 {s.ttft_ms['p50']:.2f} ms, "
                f"ITL p50 {s.itl_ms['p50']:.2f} ms, failed {s.num_failed}",
                flush=True,
            )
    out: dict[str, Any] = {}
    for side, row in sides.items():
        out[side] = {
            k: {"median": statistics.median(v), "runs": [round(x, 4) for x in v]} for k, v in row.items()
        }
    cpu = {side: out[side]["cpu_ms_per_request"]["median"] for side in out}
    out["open_minus_none_cpu_ms_per_request"] = round(cpu["open"] - cpu["none"], 4)
    out["open_over_none_cpu"] = round(cpu["open"] / cpu["none"], 3) if cpu["none"] else None
    return out


def idle_cpu(stack: Stack, seconds: float) -> dict[str, float]:
    """Router CPU (cores' worth) with no traffic: none, then with the dashboard open."""
    out = {}
    for side in ("none", "open"):
        browser = open_dashboard(stack.router_url) if side == "open" else None
        try:
            before, t0 = router_cpu_s(stack), time.perf_counter()
            time.sleep(seconds)
            out[side] = round((router_cpu_s(stack) - before) / (time.perf_counter() - t0), 5)
        finally:
            if browser is not None:
                browser.quit()
    print(f"idle router CPU: none {out['none']:.4f} cores, open {out['open']:.4f} cores", flush=True)
    return out


def page_weight(url: str) -> dict[str, Any]:
    """Bytes of the page, the first data answer and the average refresh (over 10 refreshes)."""
    page = httpx.get(f"{url}/dashboard", timeout=10)
    first = httpx.get(f"{url}/pdserve/dashboard/data", timeout=10)
    seq = first.json()["seq"]
    sizes, tick_ms, data_ms = [], [], []
    for _ in range(10):
        time.sleep(1.0)
        reply = httpx.get(
            f"{url}/pdserve/dashboard/data",
            params={f"{k}_after": v for k, v in seq.items()},
            timeout=10,
        )
        data = reply.json()
        seq = data["seq"]
        sizes.append(len(reply.content))
        tick_ms.append(data["router"]["last_tick_ms"])
        data_ms.append(data["router"]["last_data_ms"])
    out = {
        "page_bytes": len(page.content),
        "first_data_bytes": len(first.content),
        "refresh_bytes_mean": round(statistics.mean(sizes)),
        "refresh_bytes_max": max(sizes),
        "requests_on_load": 2,  # the page and its first data answer: nothing else is fetched
        "samples_in_first_data": len(first.json()["samples"]),
        # the router's own timing of one sampling tick and of building one data answer (idle router)
        "tick_ms_median": statistics.median(tick_ms),
        "data_ms_median": statistics.median(data_ms),
    }
    print(f"page weight: {out}", flush=True)
    return out


def kill_to_shown(stack: Stack, kills: int) -> dict[str, Any]:
    """SIGKILL a fake worker ``kills`` times; seconds until the open page draws it lost."""
    browser = open_dashboard(stack.router_url)
    worker_cmd = [str(a) for a in stack.procs["worker"].args]  # type: ignore[union-attr]
    control = worker_cmd[worker_cmd.index("--router") + 1]
    times = []
    try:
        for i in range(kills):
            wid = f"victim-{i}"
            s5 = str(HERE.with_name("s5_router_overhead.py"))
            cmd = [sys.executable, s5, "fake-worker", "--router", control, "--worker-id", wid]
            proc = subprocess.Popen(cmd)
            state_js = (
                f"const g = document.querySelector('g.worker[data-worker=\"{wid}\"]'); "
                "return g && g.dataset.state"
            )
            deadline = time.monotonic() + 60
            while browser.execute_script(state_js) != "ready":
                assert time.monotonic() < deadline, f"{wid} never shown ready"
                time.sleep(0.05)
            time.sleep(0.5)
            killed = time.monotonic()
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            while browser.execute_script(state_js) != "lost":
                assert time.monotonic() - killed < 60, f"{wid} never shown lost"
                time.sleep(0.02)
            times.append(time.monotonic() - killed)
            print(f"kill #{i}: shown lost after {times[-1]:.3f} s", flush=True)
    finally:
        browser.quit()
    return {
        "seconds": [round(t, 3) for t in times],
        "median_s": round(statistics.median(times), 3),
        "max_s": round(max(times), 3),
        "poll_interval_s": 1.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="A B rounds per phase")
    parser.add_argument("--max-requests", type=int, default=1500)
    parser.add_argument("--low-requests", type=int, default=40)
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "s14_dashboard.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    stack = Stack([])
    try:
        results: dict[str, Any] = {"page_weight": page_weight(stack.router_url)}
        results["idle_router_cpu_cores"] = idle_cpu(stack, args.idle_s)
        phases = [
            Phase("max", 0, 0, output_tokens="8", concurrency=32, num_requests=args.max_requests, warmup=64),
            Phase("low", 0, 10, output_tokens="16", concurrency=1, num_requests=args.low_requests, warmup=3),
        ]
        results["phases"] = {
            p.name: cpu_per_request(stack, p, args.repeats, stack.router_url) for p in phases
        }
        results["kill_to_shown"] = kill_to_shown(stack, args.kills)
    finally:
        stack.close()
    results["settings"] = {
        "repeats": args.repeats,
        "max_requests": args.max_requests,
        "low_requests": args.low_requests,
        "idle_s": args.idle_s,
        "kills": args.kills,
    }
    results["machine"] = {**machine_info(), "load_avg_at_start": list(load_before)}
    path = write_json(args.output, results)
    print(f"load average {os.getloadavg()} (at start {load_before}); written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
