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
import functools
import itertools
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from common import RESULTS_DIR, Setup, machine_info, ratio, write_json
from cpu_meter import CpuMeter

from pdserve.bench.metrics import percentile
from pdserve.launch.local import LaunchConfig, LocalLauncher

MODEL = "bench-50m"
VOCAB_SIZE = 32000
BOS_ID, FIRST_ORDINARY_ID = 1, 3  # ids 0-2 are pad/BOS/EOS in the byte tokenizer
KV_BYTES_PER_TOKEN = 2 * 8 * 4 * 64 * 4  # K and V × 8 layers × 4 KV heads × head_dim 64 × fp32
RESULTS = RESULTS_DIR / "s2_interference.json"
TARGETS = {  # (metric, class, baseline config, most (c)/baseline may be)
    "bg_itl_p99_vs_a": ("itl_p99_ms", "bg", "a", 0.2),
    "bg_itl_p99_vs_b": ("itl_p99_ms", "bg", "b", 0.6),
    "fg_ttft_p50_vs_b": ("ttft_p50_ms", "fg", "b", 1.3),
}
CLASSES = ("bg", "fg")
RATIO_METRICS = (("bg", "itl_p99_ms"), ("bg", "itl_p50_ms"), ("fg", "ttft_p50_ms"), ("fg", "ttft_p99_ms"))


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


# ----------------------------------------------------------------------------- the client


@dataclass
class RequestRecord:
    """One streamed request as the client saw it (perf_counter seconds)."""

    kind: str  # "bg" or "fg"
    max_tokens: int
    window: int | None  # index of the rate window a foreground request belongs to
    t_send: float
    chunk_times: list[float] = field(default_factory=list)  # arrival of the chunk of each token
    num_multi_token_chunks: int = 0  # chunks that carried more than one token
    num_completion_tokens: int | None = None  # from the usage chunk; None: unfinished
    num_cached_tokens: int = 0
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times[0] - self.t_send if self.chunk_times else None


def prompt_ids(seed: str, num_tokens: int) -> list[int]:
    """A BOS and num_tokens - 1 seeded random ordinary ids: distinct prompts, no prefix-cache hits."""
    rng = random.Random(seed)
    return [BOS_ID, *(rng.randrange(FIRST_ORDINARY_ID, VOCAB_SIZE) for _ in range(num_tokens - 1))]


class LoadGenerator:
    """Background streams and foreground arrivals against one deployment; keeps every record."""

    def __init__(self, client: httpx.AsyncClient, args: argparse.Namespace) -> None:
        self.client = client
        self.args = args
        self.records: list[RequestRecord] = []

    async def request(
        self, kind: str, ids: list[int], max_tokens: int, window: int | None = None
    ) -> RequestRecord:
        """Stream one completion, timing every content chunk."""
        body = {
            "model": MODEL, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "logprobs": 0,
        }
        rec = RequestRecord(kind, max_tokens, window, time.perf_counter())
        self.records.append(rec)
        try:
            async with self.client.stream("POST", "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    rec.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                    return rec
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    now = time.perf_counter()
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        rec.error = str(chunk["error"])[:200]
                        continue
                    if chunk.get("choices"):
                        # logprobs list the chunk's tokens, also those whose text is still held back
                        choice = chunk["choices"][0]
                        logprobs = choice.get("logprobs")
                        num_tokens = len(logprobs["tokens"]) if logprobs else int(bool(choice.get("text")))
                        rec.num_multi_token_chunks += num_tokens > 1
                        rec.chunk_times.extend([now] * num_tokens)
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                        rec.num_completion_tokens = usage["completion_tokens"]
                        details = usage.get("prompt_tokens_details") or {}
                        rec.num_cached_tokens = details.get("cached_tokens") or 0
        except httpx.HTTPError as exc:
            rec.error = f"{type(exc).__name__}: {exc}"
        return rec

    async def background(self, stream: int) -> None:
        """One background stream: requests back to back until cancelled."""
        a = self.args
        for n in itertools.count():
            max_tokens = a.bg_output if n else min(a.bg_output, a.bg_output * (stream + 1) // a.bg_streams)
            ids = prompt_ids(f"{a.seed}/bg/{stream}/{n}", a.bg_prompt)
            rec = await self.request("bg", ids, max_tokens)
            if rec.error:
                await asyncio.sleep(0.5)  # a failing server is reported, not hammered

    async def foreground(self, window: int, rate: float, t0: float) -> list[RequestRecord]:
        """Poisson arrivals at ``rate`` over [t0, t0 + duration); returns once every one has finished."""
        a = self.args
        offsets = poisson_offsets(rate, a.duration, f"{a.seed}/arrivals/{rate}")

        async def one(j: int, offset_s: float) -> RequestRecord:
            await asyncio.sleep(max(t0 + offset_s - time.perf_counter(), 0.0))
            return await self.request("fg", prompt_ids(f"{a.seed}/fg/{rate}/{j}", a.fg_prompt), a.fg_output,
                                      window)

        return list(await asyncio.gather(*(one(j, off) for j, off in enumerate(offsets))))


def poisson_offsets(rate: float, duration_s: float, seed: str) -> list[float]:
    """Arrival offsets of a Poisson process of ``rate``/s within [0, duration_s), seeded."""
    rng = random.Random(seed)
    offsets: list[float] = []
    t = rng.expovariate(rate)
    while t < duration_s:
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


# ----------------------------------------------------------------------------- statistics


@dataclass
class Samples:
    """Raw measurements of one request class in one window (pooled over rounds before percentiles)."""

    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    num_sent: int = 0
    num_errors: int = 0
    num_tokens: int = 0  # tokens of this class that reached the client inside the window
    window_s: float = 0.0
    num_checked: int = 0  # finished requests whose chunks were checked against usage and max_tokens
    num_mismatched: int = 0
    num_cached_prompt_tokens: int = 0
    errors: list[str] = field(default_factory=list)

    def merge(self, other: Samples) -> Samples:
        return Samples(
            self.ttft_s + other.ttft_s, self.itl_s + other.itl_s, self.num_sent + other.num_sent,
            self.num_errors + other.num_errors, self.num_tokens + other.num_tokens,
            self.window_s + other.window_s, self.num_checked + other.num_checked,
            self.num_mismatched + other.num_mismatched,
            self.num_cached_prompt_tokens + other.num_cached_prompt_tokens, self.errors + other.errors,
        )


def collect(records: list[RequestRecord], window: int, t0: float, t1: float) -> dict[str, Samples]:
    """Per class, the window's samples: foreground = the requests that arrived in the window (every
    gap of theirs); background = requests sent inside [t0, t1) for TTFT, gaps inside [t0, t1) for ITL."""
    out: dict[str, Samples] = {}
    for kind in CLASSES:
        recs = [r for r in records if r.kind == kind]
        if kind == "fg":
            sent = mine = [r for r in recs if r.window == window]
            gaps = [b - a for r in sent for a, b in itertools.pairwise(r.chunk_times)]
        else:
            sent = [r for r in recs if t0 <= r.t_send < t1]
            mine = recs
            gaps = [b - a for r in recs for a, b in itertools.pairwise(r.chunk_times) if t0 <= a and b < t1]
        finished = [r for r in mine if r.num_completion_tokens is not None]
        mismatched = [r for r in finished if r.num_multi_token_chunks
                      or not len(r.chunk_times) == r.num_completion_tokens == r.max_tokens]
        out[kind] = Samples(
            ttft_s=[r.ttft_s for r in sent if r.ttft_s is not None], itl_s=gaps, num_sent=len(sent),
            num_errors=sum(1 for r in sent if r.error),
            num_tokens=sum(1 for r in recs for t in r.chunk_times if t0 <= t < t1), window_s=t1 - t0,
            num_checked=len(finished), num_mismatched=len(mismatched),
            num_cached_prompt_tokens=sum(r.num_cached_tokens for r in finished),
            errors=sorted({r.error for r in sent if r.error})[:3],
        )
    return out


def summarize(s: Samples) -> dict[str, Any]:
    """Percentiles (ms) and counts of a class's samples."""
    ttft = [v * 1000 for v in s.ttft_s]
    itl = [v * 1000 for v in s.itl_s]
    return {
        "num_sent": s.num_sent, "num_with_first_token": len(ttft), "num_errors": s.num_errors,
        "num_itl_samples": len(itl),
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
        "ttft_max_ms": max(ttft, default=math.nan),
        "itl_p50_ms": percentile(itl, 50), "itl_p99_ms": percentile(itl, 99),
        "itl_mean_ms": sum(itl) / len(itl) if itl else math.nan, "itl_max_ms": max(itl, default=math.nan),
        "tokens_per_s": s.num_tokens / s.window_s if s.window_s else math.nan,
        "num_finished_checked": s.num_checked, "num_chunk_token_mismatches": s.num_mismatched,
        "num_cached_prompt_tokens": s.num_cached_prompt_tokens, "errors": s.errors[:3],
        "ttft_ms": [round(v, 1) for v in ttft] if len(ttft) <= 64 else None,
    }


# ----------------------------------------------------------------------------- one configuration


@dataclass
class Window:
    """One rate window of one run."""

    rate_per_s: float
    samples: dict[str, Samples]
    cpu_cores_used: dict[str, float]
    drain_s: float
    load_avg_1min_before: float

    def report(self) -> dict[str, Any]:
        return {"rate_per_s": self.rate_per_s, "duration_s": self.samples["bg"].window_s,
                "drain_s": self.drain_s, "load_avg_1min_before": self.load_avg_1min_before,
                "cpu_cores_used": self.cpu_cores_used,
                **{kind: summarize(s) for kind, s in self.samples.items()}}


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


# ----------------------------------------------------------------------------- report


def fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def print_window(w: Window) -> None:
    for kind in CLASSES:
        s = summarize(w.samples[kind])
        print(f"    rate {w.rate_per_s:g}/s {kind}: n={s['num_sent']} TTFT p50/p99 {fmt(s['ttft_p50_ms'])}/"
              f"{fmt(s['ttft_p99_ms'])} ms, ITL p50/p99 {fmt(s['itl_p50_ms'], 1)}/"
              f"{fmt(s['itl_p99_ms'], 1)} ms, {fmt(s['tokens_per_s'], 1)} tok/s, errors {s['num_errors']}, "
              f"chunk≠token {s['num_chunk_token_mismatches']}/{s['num_finished_checked']}", flush=True)
    used = ", ".join(f"{k} {v:.2f}" for k, v in w.cpu_cores_used.items())
    print(f"    cores used: {used}; drain {w.drain_s:.1f} s", flush=True)


def pool(runs: list[list[Window]], rates: list[float]) -> list[dict[str, Any]]:
    """Per rate: the samples of every run of a configuration pooled, then summarised."""
    pooled = []
    for rate in rates:
        wins = [w for run in runs for w in run if w.rate_per_s == rate]
        classes = {
            kind: summarize(functools.reduce(Samples.merge, (w.samples[kind] for w in wins), Samples()))
            for kind in CLASSES
        }
        cpu = {k: round(sum(w.cpu_cores_used[k] for w in wins) / len(wins), 3)
               for k in wins[0].cpu_cores_used}
        pooled.append({"rate_per_s": rate, "num_runs": len(wins), "cpu_cores_used_mean": cpu, **classes})
    return pooled


def print_table(results: dict[str, dict[str, Any]]) -> None:
    header = (f"{'cfg':<4}{'rate/s':>7} {'class':<6}{'n':>4}{'TTFT p50':>10}{'TTFT p99':>10}"
              f"{'ITL p50':>9}{'ITL p99':>9}{'tok/s':>7}{'chk':>8}{'busy':>7}{'other':>7}")
    print("\n" + header + "\n" + "-" * len(header))
    for key, res in results.items():
        for win in res["windows"]:
            cpu = win["cpu_cores_used_mean"]
            for kind in CLASSES:
                s = win[kind]
                ok = s["num_finished_checked"] - s["num_chunk_token_mismatches"]
                print(f"{key:<4}{win['rate_per_s']:>7g} {kind:<6}{s['num_sent']:>4}"
                      f"{fmt(s['ttft_p50_ms']):>10}{fmt(s['ttft_p99_ms']):>10}"
                      f"{fmt(s['itl_p50_ms'], 1):>9}{fmt(s['itl_p99_ms'], 1):>9}"
                      f"{fmt(s['tokens_per_s'], 1):>7}{ok:>4}/{s['num_finished_checked']:<3}"
                      f"{cpu['machine']:>7.2f}{cpu['other_processes']:>7.2f}")
    print("times in ms; chk: finished requests whose chunks each carried one token and numbered "
          "usage.completion_tokens = max_tokens;\nbusy / other: cores the whole machine / processes "
          "outside this benchmark kept busy during the window (of 2)")


def compare(results: dict[str, dict[str, Any]], rates: list[float]) -> dict[str, Any]:
    """Ratios (c)/(a) and (c)/(b) per rate, and the targets at the lowest rate."""
    def metric(key: str, rate: float, kind: str, name: str) -> float:
        for win in results.get(key, {}).get("windows", []):
            if win["rate_per_s"] == rate:
                return float(win[kind][name])
        return math.nan

    ratios: dict[str, dict[str, float]] = {}
    print("\nratios (c)/(a) and (c)/(b):")
    for rate in rates:
        r = {}
        for base in ("a", "b"):
            for kind, name in RATIO_METRICS:
                r[f"{kind}_{name}_c_over_{base}"] = ratio(
                    metric("c", rate, kind, name), metric(base, rate, kind, name)
                )
        ratios[str(rate)] = r
        for base in ("a", "b"):
            print(f"  rate {rate:g}/s, (c)/({base}): " + ", ".join(
                f"{kind} {name[:-3].replace('_', ' ')} {fmt(r[f'{kind}_{name}_c_over_{base}'], 3)}"
                for kind, name in RATIO_METRICS))
    lowest = min(rates)
    verdicts: dict[str, Any] = {}
    print(f"\ntargets at the lowest rate ({lowest:g}/s):")
    for name, (m, kind, base, limit) in TARGETS.items():
        value = ratio(metric("c", lowest, kind, m), metric(base, lowest, kind, m))
        verdict = "n/a" if math.isnan(value) else "PASS" if value <= limit else "MISS"
        verdicts[name] = {"ratio": value, "limit": limit, "verdict": verdict}
        print(f"  {kind} {m[:-3].replace('_', ' ')} (c)/({base}) = {fmt(value, 3)}  "
              f"(target ≤ {limit})  {verdict}")
    return {"ratios": ratios, "targets": verdicts}


def print_workers(key: str, run: dict[str, Any], fg_prompt: int) -> None:
    workers = run["workers"]
    relayed = workers.get("kv_bytes_relayed")  # not in every pdserve version
    note = f": kv_bytes_relayed {relayed}" if relayed is not None else ""
    print(f"\n/pdserve/workers at the end of ({key}){note}")
    for w in workers.get("workers", []):
        s = w.get("stats") or {}
        sent, received = s.get("kv_bytes_sent", 0), s.get("kv_bytes_received", 0)
        print(f"  {w['worker_id']:<10} {w['role']:<8} prompt tokens computed "
              f"{s.get('num_prompt_tokens_computed')}, steps {s.get('num_steps')}, "
              f"KV sent {sent / 2**20:.1f} MiB, received {received / 2**20:.1f} MiB, "
              f"transfers {s.get('kv_transfers')}, transports {s.get('transports')}")
    if key == "c":
        print(f"  (KV of one {fg_prompt}-token prompt: {fg_prompt * KV_BYTES_PER_TOKEN / 2**20:.0f} MiB)")


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
