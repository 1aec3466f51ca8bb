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
import json
import os
import random
import string
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from common import RESULTS_DIR, machine_info, write_json

from pdserve.launch.local import LaunchConfig, LocalLauncher

RESULTS = RESULTS_DIR / "soak.json"
SHARED_PREFIX_FRAC = 0.25
SHARED_PREFIX = "You are a careful assistant. Answer briefly and cite the page you used. " * 4  # 292 chars
MAX_ERROR_KINDS = 10


# ----------------------------------------------------------------------------- load


@dataclass(frozen=True)
class RequestSpec:
    """One request of the load: its prompt, output length and when (if ever) the client drops it."""

    prompt: str
    max_tokens: int
    abort_after_chunks: int | None  # None: read to the end


def request_spec(args: argparse.Namespace, stream: int, n: int) -> RequestSpec:
    """The n-th request of a stream; the same seed, stream and n give the same request."""
    rng = random.Random(f"{args.seed}/{stream}/{n}")
    num_chars = rng.randint(args.prompt_len[0], args.prompt_len[1])
    prefix = SHARED_PREFIX if rng.random() < SHARED_PREFIX_FRAC else ""
    words: list[str] = [prefix]
    length = len(prefix)
    while length < num_chars:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9)))
        words.append(word + " ")
        length += len(word) + 1
    prompt = "".join(words)[: max(num_chars, len(prefix) + 1)]
    max_tokens = rng.randint(args.output_len[0], args.output_len[1])
    abort = rng.randint(1, max(max_tokens // 2, 1)) if rng.random() < args.abort_frac else None
    return RequestSpec(prompt, max_tokens, abort)


@dataclass
class LoadCounters:
    """What the client saw, so far (only ever grows)."""

    num_sent: int = 0
    num_completed: int = 0  # read to [DONE] with usage.completion_tokens == max_tokens
    num_errors: int = 0
    num_aborted: int = 0  # dropped by the client on purpose (--abort-frac)
    num_cancelled: int = 0  # still running --stop-timeout after the load stopped
    num_completion_tokens: int = 0  # tokens of completed requests
    error_kinds: Counter[str] = field(default_factory=Counter)

    def error(self, message: str) -> None:
        self.num_errors += 1
        if len(self.error_kinds) < MAX_ERROR_KINDS or message in self.error_kinds:
            self.error_kinds[message] += 1


async def stream_one(client: httpx.AsyncClient, model: str, spec: RequestSpec, c: LoadCounters) -> None:
    """Stream one completion and count how it ended."""
    body = {
        "model": model, "prompt": spec.prompt, "max_tokens": spec.max_tokens, "temperature": 0.8,
        "seed": 7, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }
    c.num_sent += 1
    num_chunks = 0
    num_completion_tokens: int | None = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                c.error(f"HTTP {resp.status_code}: {(await resp.aread())[:120]!r}")
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    c.error(f"stream error: {str(chunk['error'])[:120]}")
                    return
                if chunk.get("choices"):
                    num_chunks += 1
                    if spec.abort_after_chunks is not None and num_chunks >= spec.abort_after_chunks:
                        c.num_aborted += 1
                        return  # leaving the block closes the connection: the router sees a disconnect
                if chunk.get("usage"):
                    num_completion_tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        c.error(f"{type(exc).__name__}: {str(exc)[:120]}")
        return
    if num_completion_tokens != spec.max_tokens:
        c.error(f"completion_tokens {num_completion_tokens} != max_tokens (ignore_eos)")
        return
    c.num_completed += 1
    c.num_completion_tokens += num_completion_tokens


async def load_stream(
    client: httpx.AsyncClient, args: argparse.Namespace, stream: int, deadline: float,
    stop: asyncio.Event, c: LoadCounters,
) -> None:
    """Requests back to back until the deadline, the request budget or a stop; then returns."""
    for n in range(args.max_requests):  # never more than the budget, whatever the clock does
        if time.monotonic() >= deadline or stop.is_set() or c.num_sent >= args.max_requests:
            return
        await stream_one(client, args.model, request_spec(args, stream, n), c)


# ----------------------------------------------------------------------------- sampling


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


def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (t_s, value) in value per minute; None with fewer than 3 points."""
    if len(points) < 3:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return 60 * sum((t - mt) * (v - mv) for t, v in points) / var if var else None


def summarize(run: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Growth per process, KV peaks, counters and the list of what is suspect."""
    samples = run["samples"]
    first, last = samples[0], samples[-1]
    base = next((s for s in samples if s["phase"] != "warmup"), first)
    steady = [s for s in samples if s["phase"] == "load"]
    procs: dict[str, Any] = {}
    suspects: list[str] = []
    for name in first["procs"]:
        p0, pb, p1 = first["procs"][name], base["procs"].get(name), last["procs"].get(name)
        if not (p0 and pb and p1):
            procs[name] = None
            continue
        g = {
            "rss_first_mib": p0["rss_mib"], "rss_last_mib": p1["rss_mib"],
            "rss_max_mib": max(s["procs"][name]["rss_mib"] for s in samples if s["procs"].get(name)),
            "rss_growth_mib": p1["rss_mib"] - p0["rss_mib"],
            "rss_growth_after_warmup_mib": p1["rss_mib"] - pb["rss_mib"],
            "anon_growth_after_warmup_mib": p1.get("anon_mib", 0.0) - pb.get("anon_mib", 0.0),
            "shmem_growth_after_warmup_mib": p1.get("shmem_mib", 0.0) - pb.get("shmem_mib", 0.0),
            "rss_slope_mib_per_min": slope_per_min(
                [(s["t_s"], s["procs"][name]["rss_mib"]) for s in steady if s["procs"].get(name)]
            ),
            "fds_first": p0["num_fds"], "fds_last": p1["num_fds"],
            "fd_growth": p1["num_fds"] - p0["num_fds"],
            "fd_growth_after_warmup": p1["num_fds"] - pb["num_fds"],
            "threads_first": p0["num_threads"], "threads_last": p1["num_threads"],
            "thread_growth_after_warmup": p1["num_threads"] - pb["num_threads"],
        }
        procs[name] = g
        if g["rss_growth_after_warmup_mib"] > args.rss_threshold_mib:
            suspects.append(f"{name}: RSS {g['rss_growth_after_warmup_mib']:+.1f} MiB after warm-up "
                            f"(threshold {args.rss_threshold_mib:g})")
        if g["fd_growth_after_warmup"] > args.fd_threshold:
            suspects.append(f"{name}: {g['fd_growth_after_warmup']:+.0f} fds after warm-up "
                            f"(threshold {args.fd_threshold})")
        if g["thread_growth_after_warmup"] > args.thread_threshold:
            suspects.append(f"{name}: {g['thread_growth_after_warmup']:+.0f} threads after warm-up "
                            f"(threshold {args.thread_threshold})")
    workers = sorted({w for s in samples for w in s["workers"]})
    kv = {
        w: {
            "max_used_blocks": max((s["workers"][w]["used_blocks"] for s in samples if s["workers"].get(w)),
                                   default=None),
            "max_held": max((s["workers"][w]["held"] for s in samples if s["workers"].get(w)), default=None),
            "num_unanswered_samples": sum(1 for s in samples if s["workers"].get(w) is None),
        }
        for w in workers
    }
    quiesce = run["quiesce"]
    leaked = {
        w: {k: v[k] for k in ("used_blocks", "held", "running", "waiting")}
        for w, v in quiesce["workers"].items()
        if v and (v["used_blocks"] or v["held"] or v["running"] or v["waiting"])
    }
    if not quiesce["idle"]:
        what = ", ".join(f"{w} {v}" for w, v in leaked.items()) or "a worker did not answer"
        suspects.append(f"LEAK: not idle {args.idle_timeout:g} s after the load stopped: {what}; "
                        f"router in flight {quiesce['router_inflight']}")
    c: LoadCounters = run["counters"]
    if c.num_errors:
        suspects.append(f"{c.num_errors} requests failed: {dict(c.error_kinds.most_common(3))}")
    if c.num_cancelled:
        suspects.append(f"{c.num_cancelled} requests still running {args.stop_timeout:g} s after the stop")
    for name, code in run["exited"].items():
        suspects.append(f"{name} exited with code {code} during the run")
    load_s = (steady[-1]["t_s"] - base["t_s"]) if steady else 0.0
    completed_in_load = (steady[-1]["num_completed"] - base["num_completed"]) if steady else 0
    tokens_in_load = (steady[-1]["num_completion_tokens"] - base["num_completion_tokens"]) if steady else 0
    return {
        "procs": procs, "kv": kv, "leaked": leaked, "quiesce": quiesce, "suspects": suspects,
        "counters": {**{k: v for k, v in asdict(c).items() if k != "error_kinds"},
                     "error_kinds": dict(c.error_kinds)},
        "requests_per_s_after_warmup": completed_in_load / load_s if load_s else None,
        "tokens_per_s_after_warmup": tokens_in_load / load_s if load_s else None,
        "stop_s": run["stop_s"],
    }


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(samples: list[dict[str, Any]]) -> None:
    workers = sorted({w for s in samples for w in s["workers"]})
    procs = list(samples[0]["procs"])
    head = f"{'t_s':>6} {'phase':<8}{'done':>6}{'err':>5}{'abrt':>5}{'req/s':>7}{'tok/s':>7}"
    head += "".join(f"{w + ' kv':>14}" for w in workers)
    head += "".join(f"{p + ' MiB/fd/thr':>23}" for p in procs)
    print(head + "\n" + "-" * len(head))
    for s in samples:
        row = (f"{s['t_s']:>6.0f} {s['phase']:<8}{s['num_completed']:>6}{s['num_errors']:>5}"
               f"{s['num_aborted']:>5}{fmt(s['requests_per_s']):>7}{fmt(s['tokens_per_s'], '.0f'):>7}")
        for w in workers:
            v = s["workers"].get(w)
            row += f"{(str(v['used_blocks']) + '/' + str(v['held'])) if v else '-':>14}"
        for p in procs:
            v = s["procs"].get(p)
            cell = f"{v['rss_mib']:.1f}/{v['num_fds']:.0f}/{v['num_threads']:.0f}" if v else "gone"
            row += f"{cell:>23}"
        print(row)
    print("(kv: blocks used/requests held; done: completed requests, cumulative)")


def print_summary(summary: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n{'process':<12}{'RSS first':>10}{'last':>9}{'growth':>9}{'after wu':>9}{'anon wu':>9}"
          f"{'shm wu':>8}{'MiB/min':>9}{'fds':>10}{'fd wu':>7}{'thr':>8}")
    for name, g in summary["procs"].items():
        if g is None:
            print(f"{name:<12} (no samples: the process was gone)")
            continue
        flag = ("  SUSPECT" if g["rss_growth_after_warmup_mib"] > args.rss_threshold_mib
                or g["fd_growth_after_warmup"] > args.fd_threshold
                or g["thread_growth_after_warmup"] > args.thread_threshold else "")
        print(f"{name:<12}{g['rss_first_mib']:>10.1f}{g['rss_last_mib']:>9.1f}{g['rss_growth_mib']:>+9.1f}"
              f"{g['rss_growth_after_warmup_mib']:>+9.1f}{g['anon_growth_after_warmup_mib']:>+9.1f}"
              f"{g['shmem_growth_after_warmup_mib']:>+8.1f}{fmt(g['rss_slope_mib_per_min'], '+.2f'):>9}"
              f"{g['fds_first']:>5.0f}→{g['fds_last']:<4.0f}{g['fd_growth_after_warmup']:>+7.0f}"
              f"{g['threads_first']:>4.0f}→{g['threads_last']:<3.0f}{flag}")
    print("(MiB; 'wu': from the first sample after --warmup to the last sample; MiB/min: slope under load)")
    for w, k in summary["kv"].items():
        print(f"{w}: max KV blocks used {k['max_used_blocks']}, max held {k['max_held']}, "
              f"samples without stats {k['num_unanswered_samples']}")
    c, q = summary["counters"], summary["quiesce"]
    print(f"requests: sent {c['num_sent']}, completed {c['num_completed']}, errors {c['num_errors']}, "
          f"aborted by the client {c['num_aborted']}, cancelled at the stop {c['num_cancelled']}; "
          f"{fmt(summary['requests_per_s_after_warmup'], '.2f')} req/s, "
          f"{fmt(summary['tokens_per_s_after_warmup'], '.0f')} tok/s after warm-up")
    if q["idle"]:
        print(f"quiesce: every worker at 0 blocks used / 0 held {q['after_s']:.1f} s after the load "
              f"stopped ({summary['stop_s']:.1f} s to finish the requests in flight); leaked blocks 0")
    else:
        leaked_blocks = sum(v["used_blocks"] for v in summary["leaked"].values())
        print(f"quiesce: NOT idle after {q['after_s']:.1f} s; leaked blocks {leaked_blocks}, "
              f"{summary['leaked']}")
    if summary["suspects"]:
        print("\nSUSPECT:")
        for s in summary["suspects"]:
            print(f"  - {s}")
    else:
        print(f"\nOK: nothing grew past RSS +{args.rss_threshold_mib:g} MiB / +{args.fd_threshold} fds / "
              f"+{args.thread_threshold} threads after warm-up, no errors, no leaked blocks")


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
