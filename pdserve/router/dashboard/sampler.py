"""The dashboard's time series: a ring buffer of periodic samples of what the router already counts.

Every ``interval_s`` a tick:

1. reads the router's metrics in one pass over its Prometheus registry
   (requests by outcome, delivered tokens, HTTP answers by status, the
   inter-token-gap histogram's buckets, KV bytes);
2. takes the traces that ended since the last tick (a tracer listener queues
   them: one list append per request, nothing else on the request path);
3. appends one numbered sample: request and token rates, ITL p50/p99
   (interpolated in the histogram's buckets, as Prometheus'
   ``histogram_quantile``) and TTFT p50/p99 with the mean TTFT breakdown
   (exact, from the traces), all over the last ``window_s``; errors, 429s and
   503s and routing decisions by reason counted since the previous sample;
   in-flight requests and the workers' queues now.

The KV flow between each prefill and decode worker pair comes from the same
traces (their ``routed`` and ``kv_transfer_end`` events): bytes moved per
second over the window, counted when a request ends. Each tick's cost is in
the data (``last_tick_ms``); docs/observability.md has the measured figures.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from pdserve.bench.metrics import percentile
from pdserve.router.registry import Registry
from pdserve.router.tracing import TTFT_PARTS, RequestTrace


@dataclass
class Counters:
    """The router's cumulative counters at one moment."""

    outcomes: dict[str, float] = field(default_factory=dict)
    tokens: float = 0.0
    http: dict[str, float] = field(default_factory=dict)  # status → answers (all endpoints)
    itl_buckets: list[tuple[float, float]] = field(default_factory=list)  # (upper bound s, cumulative)
    kv_bytes: float = 0.0
    placements: dict[str, float] = field(default_factory=dict)  # routing decisions by reason


def read_counters(registry: CollectorRegistry) -> Counters:
    """One pass over the registry."""
    c = Counters()
    for family in registry.collect():
        name = family.name
        if name == "pdserve_requests":
            for s in family.samples:
                if s.name.endswith("_total"):
                    c.outcomes[s.labels["outcome"]] = s.value
        elif name == "pdserve_generation_tokens":
            c.tokens = sum(s.value for s in family.samples if s.name.endswith("_total"))
        elif name == "pdserve_http_responses":
            for s in family.samples:
                if s.name.endswith("_total"):
                    status = s.labels["status"]
                    c.http[status] = c.http.get(status, 0.0) + s.value
        elif name == "pdserve_inter_token_latency_seconds":
            c.itl_buckets = [
                (float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket")
            ]
        elif name == "pdserve_kv_transfer_bytes":
            c.kv_bytes = sum(s.value for s in family.samples)
        elif name == "pdserve_placements":
            c.placements = {s.labels["reason"]: s.value for s in family.samples if s.name.endswith("_total")}
    return c


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """The q-quantile (0-1) of a cumulative histogram, interpolated linearly inside its bucket.

    NaN when the histogram is empty; the highest finite bound when the
    quantile falls in the ``+Inf`` bucket (as Prometheus does).
    """
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(upper):
                return lower
            inside = cumulative - below
            return lower + (upper - lower) * ((rank - below) / inside if inside > 0 else 1.0)
        lower, below = upper, cumulative
    return lower


Buckets = list[tuple[float, float]]


def _delta_buckets(now: Buckets, before: Buckets) -> Buckets:
    if len(before) != len(now):
        return now
    return [(le, c - b) for (le, c), (_, b) in zip(now, before, strict=True)]


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1e3, 3)


@dataclass
class _Ended:
    """What a tick keeps of one ended trace (for the window)."""

    at_s: float  # monotonic
    ttft_s: float | None
    parts_s: dict[str, float] | None
    prefill_worker: str | None
    decode_worker: str | None
    kv_bytes: int


def _ended(trace: RequestTrace, at_s: float) -> _Ended:
    prefill = decode = None
    kv_bytes = 0
    for name, _, attrs in trace.events:
        if name == "routed" and attrs:
            prefill, decode = attrs.get("prefill_worker"), attrs.get("decode_worker")
        elif name == "kv_transfer_end" and attrs:
            kv_bytes += int(attrs.get("bytes") or 0)
    b = trace.breakdown
    return _Ended(
        at_s, None if b is None else b.ttft_s, None if b is None else b.parts(), prefill, decode, kv_bytes
    )


class Sampler:
    """Periodic samples in a ring buffer, plus the recent traces and KV flows."""

    def __init__(
        self,
        registry: CollectorRegistry,
        workers: Registry,
        inflight: Any,
        interval_s: float = 1.0,
        window_s: float = 5.0,
        keep: int = 300,
        keep_traces: int = 50,
    ) -> None:
        """``inflight``: a callable returning the requests in flight now (the dispatcher's count)."""
        self.registry = registry
        self.workers = workers
        self.inflight = inflight
        self.interval_s = interval_s
        self.window_s = window_s
        self.samples: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        self.last_seq = 0
        self.traces: collections.deque[tuple[int, RequestTrace]] = collections.deque(maxlen=keep_traces)
        self.last_trace_seq = 0
        self.totals = Counters()
        self.last_tick_ms = 0.0
        self._pending: list[RequestTrace] = []
        self._history: collections.deque[tuple[float, Counters]] = collections.deque()
        self._window: collections.deque[_Ended] = collections.deque()

    def on_trace(self, trace: RequestTrace) -> None:
        """Tracer listener: queue an ended trace for the next tick (the only per-request work)."""
        self._pending.append(trace)

    def tick(self, now_s: float | None = None) -> dict[str, Any]:
        """Take one sample now (``now_s``: monotonic, for tests); returns it."""
        started = time.perf_counter()
        now = time.monotonic() if now_s is None else now_s
        counters = read_counters(self.registry)
        previous = self._history[-1][1] if self._history else counters
        self._history.append((now, counters))
        while len(self._history) > 1 and now - self._history[1][0] >= self.window_s:
            self._history.popleft()
        base_s, base = self._history[0]
        span_s = now - base_s

        pending, self._pending = self._pending, []
        for trace in pending:
            self.last_trace_seq += 1
            self.traces.append((self.last_trace_seq, trace))
            self._window.append(_ended(trace, now))
        while self._window and now - self._window[0].at_s > self.window_s:
            self._window.popleft()

        def rate(now_value: float, base_value: float) -> float | None:
            return round((now_value - base_value) / span_s, 3) if span_s > 0 else None

        ttfts = [e.ttft_s for e in self._window if e.ttft_s is not None]
        parts = [e.parts_s for e in self._window if e.parts_s is not None]
        # (the first sample: everything since the router started)
        itl = counters.itl_buckets
        if base is not counters:
            itl = _delta_buckets(itl, base.itl_buckets)
        load = [w.load for w in self.workers.all()]
        self.last_seq += 1
        sample = {
            "seq": self.last_seq,
            "t": round(time.time(), 3),
            "req_s": rate(counters.outcomes.get("finished", 0.0), base.outcomes.get("finished", 0.0)),
            "tok_s": rate(counters.tokens, base.tokens),
            "kv_bytes_s": rate(counters.kv_bytes, base.kv_bytes),
            "errors": _delta(counters.outcomes, previous.outcomes, "error"),
            "rejected": _delta(counters.outcomes, previous.outcomes, "rejected"),
            "http_429": _delta(counters.http, previous.http, "429"),
            "http_503": _delta(counters.http, previous.http, "503"),
            "placements": {
                reason: n
                for reason in counters.placements
                if (n := _delta(counters.placements, previous.placements, reason))
            },
            "ttft_p50_ms": _ms(percentile(ttfts, 50)),
            "ttft_p99_ms": _ms(percentile(ttfts, 99)),
            "itl_p50_ms": _ms(bucket_quantile(0.5, itl)),
            "itl_p99_ms": _ms(bucket_quantile(0.99, itl)),
            "ttft_parts_ms": {
                part: round(1e3 * sum(p[part] for p in parts) / len(parts), 3) for part in TTFT_PARTS
            }
            if parts
            else None,
            "num_ended": len(ttfts),
            "inflight": int(self.inflight()),
            "running": sum(x.num_running for x in load),
            "waiting": sum(x.num_waiting + x.num_waiting_for_kv for x in load),
        }
        self.samples.append(sample)
        self.totals = counters
        self.last_tick_ms = round((time.perf_counter() - started) * 1e3, 3)
        return sample

    def flows(self) -> list[dict[str, Any]]:
        """KV moved between each prefill → decode pair over the window (bytes/s, requests)."""
        pairs: dict[tuple[str, str], list[int]] = {}
        for e in self._window:
            if e.prefill_worker and e.decode_worker:
                entry = pairs.setdefault((e.prefill_worker, e.decode_worker), [0, 0])
                entry[0] += e.kv_bytes
                entry[1] += 1
        return [
            {"src": p, "dst": d, "bytes_s": round(b / self.window_s, 1), "requests": n}
            for (p, d), (b, n) in sorted(pairs.items())
        ]

    def samples_after(self, seq: int) -> list[dict[str, Any]]:
        """The kept samples numbered above ``seq``, oldest first."""
        if seq >= self.last_seq:
            return []
        return [s for s in self.samples if s["seq"] > seq]

    def traces_after(self, seq: int, limit: int = 20) -> list[dict[str, Any]]:
        """The newest ended traces numbered above ``seq`` (at most ``limit``), oldest first, as dicts."""
        chosen = [(n, t) for n, t in self.traces if n > seq][-limit:] if seq < self.last_trace_seq else []
        return [{"seq": n, **t.to_dict()} for n, t in chosen]


def _delta(now: dict[str, float], before: dict[str, float], key: str) -> int:
    return int(now.get(key, 0.0) - before.get(key, 0.0))
