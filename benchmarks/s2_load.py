"""S2's client: the streaming load generator (background streams, Poisson foreground) and its samples.

1. :class:`LoadGenerator` streams completions as token-id prompts and records, per
   request, the arrival time of every token's chunk (:class:`RequestRecord`).
2. :func:`collect` turns one rate window's records into per-class :class:`Samples`.
3. :func:`summarize` reduces samples to the percentiles and counts the result file holds;
   a :class:`Window` is one rate window of one run.

:mod:`s2_interference` runs the deployments; :mod:`s2_report` prints and compares.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from pdserve.bench.metrics import percentile

MODEL = "bench-50m"
VOCAB_SIZE = 32000
BOS_ID, FIRST_ORDINARY_ID = 1, 3  # ids 0-2 are pad/BOS/EOS in the byte tokenizer
CLASSES = ("bg", "fg")


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
