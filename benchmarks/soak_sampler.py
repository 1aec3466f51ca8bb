"""The soak test's sampling: per process ``/proc`` figures and per worker KV blocks, at an interval.

1. :class:`Sampler` takes a sample every ``--interval`` seconds: RSS, file descriptors and
   threads of the router and each worker (:func:`read_proc`), the KV blocks each worker
   holds (:func:`worker_kv`, from ``GET /pdserve/workers``) and the load counters.
2. :func:`wait_idle` polls after the load until every worker and the router are idle;
   what is still held then is reported as leaked.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

import httpx
from soak_load import LoadCounters

from pdserve.launch.local import LocalLauncher


def read_proc(pid: int) -> dict[str, float] | None:
    """RSS (MiB, with its anonymous and shared-memory parts), open fds and threads; None once gone."""
    fields = {"VmRSS": "rss_mib", "RssAnon": "anon_mib", "RssShmem": "shmem_mib", "Threads": "num_threads"}
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in fields:
                    number = float(value.split()[0])
                    out[fields[key]] = number / 1024 if key != "Threads" else number  # kB → MiB
        out["num_fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None
    return out


def worker_kv(reply: dict[str, Any]) -> dict[str, dict[str, int] | None]:
    """Per worker id: KV blocks used (total − free), requests held, queue lengths; None: no answer."""
    kv: dict[str, dict[str, int] | None] = {}
    for w in reply.get("workers", []):
        stats = w.get("stats")
        if not stats:
            kv[w["worker_id"]] = None
            continue
        load = stats["load"]
        kv[w["worker_id"]] = {
            "used_blocks": load["num_total_blocks"] - load["num_free_blocks"],
            "held": load["num_held"],
            "cached_blocks": load["num_cached_blocks"],
            "total_blocks": load["num_total_blocks"],
            "running": load["num_running"],
            "waiting": load["num_waiting"],
        }
    return kv


async def get_workers(client: httpx.AsyncClient) -> dict[str, Any] | None:
    """``GET /pdserve/workers``; None when the router does not answer."""
    try:
        reply = await client.get("/pdserve/workers", timeout=10.0)
        reply.raise_for_status()
        return dict(reply.json())
    except (httpx.HTTPError, ValueError):
        return None


class Sampler:
    """Takes the samples; keeps the previous one to compute throughput over the interval."""

    def __init__(
        self, client: httpx.AsyncClient, launcher: LocalLauncher, c: LoadCounters, args: argparse.Namespace
    ) -> None:
        self.client = client
        self.warmup_s: float = args.warmup
        self.interval_s: float = args.interval
        self.launcher = launcher
        self.counters = c
        self.t0 = time.monotonic()
        self.samples: list[dict[str, Any]] = []
        self.exited: dict[str, int] = {}

    async def sample(self, phase: str) -> dict[str, Any]:
        now = time.monotonic()
        if phase == "load" and now - self.t0 < self.warmup_s:
            phase = "warmup"
        reply = await get_workers(self.client)
        procs = {}
        for name, proc in self.launcher.procs:
            if proc.poll() is not None:
                self.exited.setdefault(name, proc.returncode)
            procs[name] = read_proc(proc.pid)
        c = self.counters
        prev = self.samples[-1] if self.samples else None
        dt_s = now - self.t0 - prev["t_s"] if prev else 0.0
        if dt_s < self.interval_s / 2:  # the extra samples at the end: too short to give a rate
            dt_s = 0.0
        s = {
            "t_s": round(now - self.t0, 2),
            "phase": phase,
            "num_sent": c.num_sent,
            "num_completed": c.num_completed,
            "num_errors": c.num_errors,
            "num_aborted": c.num_aborted,
            "requests_per_s": (c.num_completed - prev["num_completed"]) / dt_s if prev and dt_s else None,
            "tokens_per_s": (
                (c.num_completion_tokens - prev["num_completion_tokens"]) / dt_s if prev and dt_s else None
            ),
            "num_completion_tokens": c.num_completion_tokens,
            "router_inflight": reply.get("num_inflight") if reply else None,
            "workers": worker_kv(reply) if reply else {},
            "procs": procs,
        }
        self.samples.append(s)
        return s

    async def every(self, phase: dict[str, str], stop: asyncio.Event) -> None:
        """Sample on a fixed grid until cancelled; sets ``stop`` when a child exits."""
        while True:
            s = await self.sample(phase["now"])
            print(progress_line(s), file=sys.stderr, flush=True)
            if self.exited:
                stop.set()
            await asyncio.sleep(max(self.t0 + len(self.samples) * self.interval_s - time.monotonic(), 0.0))


def progress_line(s: dict[str, Any]) -> str:
    """One sample as a progress line."""
    kv = " ".join(f"{k}:{v['used_blocks']}/{v['held']}" if v else f"{k}:-" for k, v in s["workers"].items())
    rss = " ".join(f"{k}:{p['rss_mib']:.0f}M" if p else f"{k}:gone" for k, p in s["procs"].items())
    return (f"[soak] t={s['t_s']:.0f}s {s['phase']} done={s['num_completed']} err={s['num_errors']} "
            f"kv(used/held) {kv} rss {rss}")


async def wait_idle(client: httpx.AsyncClient, timeout_s: float) -> dict[str, Any]:
    """Poll until nothing is in use anywhere; returns whether that happened, when, and what was left."""
    t0 = time.monotonic()
    kv: dict[str, dict[str, int] | None] = {}
    inflight = None
    while True:
        reply = await get_workers(client)
        if reply:
            kv, inflight = worker_kv(reply), reply.get("num_inflight")
            idle = inflight == 0 and bool(kv) and all(
                v is not None and v["used_blocks"] == 0 and v["held"] == 0 and v["running"] == 0
                and v["waiting"] == 0 for v in kv.values()
            )
            if idle:
                return {"idle": True, "after_s": round(time.monotonic() - t0, 2), "workers": kv,
                        "router_inflight": inflight}
        if time.monotonic() - t0 >= timeout_s:
            return {"idle": False, "after_s": round(time.monotonic() - t0, 2), "workers": kv,
                    "router_inflight": inflight}
        await asyncio.sleep(0.5)
