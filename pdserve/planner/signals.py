"""What the planner sees: one snapshot of the load and of the deployment, as plain data.

Everything here is read from what the router already exposes to anyone:

* ``GET /pdserve/traces?inflight=true`` — the recent ended generations:
  arrival time, prompt and output lengths, time to first token and its
  breakdown, end; and the generations still in flight. From them: the
  arrival rate (ended and in flight: a backlog is load, not idleness), the
  length distributions, the measured SLO attainment (an in-flight request
  already past the TTFT SLO is a miss), and the measured speeds (prefill
  tokens/s from the breakdown's prefill part; inter-token latency against
  the decode batch it ran in).
* ``GET /pdserve/workers?stats=false`` — the deployment: targets, the pools'
  registered workers, the supervisor's slots (a worker still ``starting``).
* ``GET /metrics`` — per-worker queues and KV usage, and the measured prefill
  rate when the router exports it (``pdserve_worker_prefill_rate_tokens_per_second``).

:func:`parse` turns the three documents into a :class:`Signals` (pure: the
unit tests feed it recorded snapshots); :func:`read` fetches them;
:func:`assemble` builds one from plain data (the simulator's own records).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

POOLS = ("prefill", "decode", "mixed")
#: Traces the planner asks for; an answer this long may cover less than the window.
MAX_TRACES = 1000
FULL_TRACES = 250  # the router's default buffer; a list this long is treated as possibly cut
#: Fewest arrivals in a window for :attr:`Signals.observed_s` to tell a load's start from a lull.
MIN_ONSET = 8


@dataclass(frozen=True)
class Shape:
    """Workers per pool, and the torch threads of each (0: not set by the planner)."""

    prefill: int = 0
    decode: int = 0
    mixed: int = 0
    threads: int = 0

    @property
    def workers(self) -> int:
        """Workers in all pools."""
        return self.prefill + self.decode + self.mixed

    @property
    def cores(self) -> int:
        """What the shape costs: workers × threads (workers when the threads are not set)."""
        return self.workers * max(self.threads, 1)

    @property
    def servable(self) -> bool:
        """A request can be served: a mixed worker, or a prefill and a decode worker."""
        return self.mixed > 0 or (self.prefill > 0 and self.decode > 0)

    def targets(self) -> dict[str, int]:
        """The body of a ``POST /pdserve/scale``: every pool, so P and D change in one step, and the
        threads per worker when set."""
        body = {"prefill": self.prefill, "decode": self.decode, "mixed": self.mixed}
        return body | ({"threads": self.threads} if self.threads else {})

    @classmethod
    def of(cls, counts: Mapping[str, Any] | None) -> Shape:
        """From ``{"prefill": 1, ...}`` (missing pools: 0)."""
        counts = counts or {}
        return cls(*(int(counts.get(p) or 0) for p in POOLS))

    def __str__(self) -> str:
        if self.prefill == self.decode == 0:
            text = f"{self.mixed}M"
        else:
            text = f"{self.prefill}P+{self.decode}D" + (f"+{self.mixed}M" if self.mixed else "")
        return text + (f"×{self.threads}t" if self.threads else "")


@dataclass(frozen=True)
class RequestSample:
    """One ended generation, as the planner uses it (seconds, tokens)."""

    arrived_s: float  # unix time
    prompt_tokens: int
    output_tokens: int
    ttft_s: float | None
    itl_s: float | None  # mean gap between its tokens (None: fewer than two)
    prefill_s: float | None  # the breakdown's prefill part, when the worker timed it
    overhead_s: float  # router queue + delivery: the TTFT that is neither worker queue nor prefill
    e2e_s: float | None
    ok: bool  # finished normally
    max_gap_s: float | None = None  # the longest wait between two of its token messages (None: not known)


@dataclass(frozen=True)
class WorkerSignal:
    """One registered worker's load."""

    worker_id: str
    role: str
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefill_rate_tps: float | None = None
    draining: bool = False
    threads: int = 0  # its torch threads as it reports them (0: not reported)


@dataclass(frozen=True)
class Signals:
    """One snapshot (see the module docstring); derived figures are properties."""

    taken_s: float  # unix time
    window_s: float  # requests arrived within this many seconds before ``taken_s`` count
    requests: tuple[RequestSample, ...]
    workers: tuple[WorkerSignal, ...]
    targets: Shape
    actual: Shape  # registered and not draining
    starting: tuple[str, ...] = ()  # slots not ready yet (starting, restarting, flipping)
    failed: tuple[str, ...] = ()  # slots the supervisor gave up on
    supervised: bool = True
    prefill_rate_tps: float | None = field(default=None)  # the router's measure, if exported
    #: Requests that arrived within the window and have not ended: a backlog (a queue behind a
    #: full cache, long outputs) must not look like an idle deployment.
    inflight: tuple[RequestSample, ...] = ()
    #: fewest arrivals for :attr:`observed_s` to tell a load's start from a lull
    min_onset: int = MIN_ONSET

    @property
    def arrival_rate(self) -> float:
        """Requests per second over the window, ended and in flight (0 with no traffic: never NaN)."""
        if self.window_s <= 0:
            return 0.0
        return (len(self.requests) + len(self.inflight)) / self.observed_s

    def arrival_rate_bound(self, z: float = 1.645) -> float:
        """An upper confidence bound of the arrival rate (one-sided, ``z`` standard deviations; 95 %
        by default): the window holds a Poisson count ``n``, whose mean may well be higher than
        ``n`` (Wilson–Hilferty: ``(n+1)(1 − 1/(9(n+1)) + z/(3√(n+1)))³``). A 30 s window of a
        1 req/s stream reads 0.7 one time in twenty."""
        if self.window_s <= 0:
            return 0.0
        n1 = len(self.requests) + len(self.inflight) + 1
        return n1 * (1 - 1 / (9 * n1) + z / (3 * math.sqrt(n1))) ** 3 / self.observed_s

    @property
    def observed_s(self) -> float:
        """The seconds the window's arrivals are counted over: the window, or, when the load
        started inside it, the time since it started.

        Traffic that began 20 s ago read through a 30 s window is not 2/3 of its rate (S7: the
        planner left 2 mixed workers for 1P+1D 20 s into the chat phase on 0.6 req/s read for
        0.9). The test: with ``n`` arrivals, a steady stream leaves a gap before the first one of
        more than ``3·window/n`` with probability ``e⁻³`` (5 %); such a gap means the stream
        started late, and the rate is counted from its first arrival (the span stretched by
        ``1 + 1/n``: a steady stream's first arrival comes one mean gap after the start).
        Below ``min_onset`` arrivals the whole window is used (too few to tell)."""
        arrived = [r.arrived_s for r in (*self.requests, *self.inflight)]
        n = len(arrived)
        if n < self.min_onset:
            return self.window_s
        span = self.taken_s - min(arrived)
        if self.window_s - span <= 3 * self.window_s / n:
            return self.window_s
        return min(max(span * (1 + 1 / n), 1e-3), self.window_s)

    @property
    def prompt_lengths(self) -> list[int]:
        """Prompt tokens of the window's requests, ended and in flight."""
        return [r.prompt_tokens for r in (*self.requests, *self.inflight)]

    def _overdue(self, ttft_slo_s: float, per_token_s: float = 0.0) -> list[float]:
        """In-flight requests past the TTFT SLO (``ttft_slo_s`` + ``per_token_s`` × prompt tokens):
        their TTFT, or how long they have waited for it."""
        out = []
        for r in self.inflight:
            ttft = r.ttft_s if r.ttft_s is not None else self.taken_s - r.arrived_s
            if ttft > ttft_slo_s + per_token_s * r.prompt_tokens:
                out.append(ttft)
        return out

    @property
    def output_lengths(self) -> list[int]:
        """Output tokens of the window's requests."""
        return [r.output_tokens for r in self.requests]

    def attainment(self, ttft_slo_s: float, itl_slo_s: float, per_token_s: float = 0.0,
                   max_gap_s: float | None = None) -> float | None:
        """Share of the window's requests that finished within both SLOs, in-flight requests
        already past the TTFT SLO counted as misses (None: no request). A length-aware TTFT SLO
        allows ``ttft_slo_s`` + ``per_token_s`` × the request's prompt tokens; with a stall SLO
        ``max_gap_s``, a request whose longest gap between tokens passed it missed (the terms the
        planner predicts, so that what it measures can be held against what it predicted)."""
        overdue = len(self._overdue(ttft_slo_s, per_token_s))
        if not self.requests and not overdue:
            return None
        good = sum(
            1
            for r in self.requests
            if r.ok
            and r.ttft_s is not None
            and r.ttft_s <= ttft_slo_s + per_token_s * r.prompt_tokens
            and (r.itl_s or 0.0) <= itl_slo_s
            and (max_gap_s is None or (r.max_gap_s or 0.0) <= max_gap_s)
        )
        return good / (len(self.requests) + overdue)

    def measured_p90(self, ttft_slo_s: float = math.inf) -> tuple[float | None, float | None]:
        """The window's TTFT and mean-ITL 90th percentiles (None when not measured); in-flight
        requests past ``ttft_slo_s`` join the TTFTs with their wait so far (a lower bound)."""
        ttfts = [r.ttft_s for r in self.requests if r.ttft_s is not None] + self._overdue(ttft_slo_s)
        return (
            percentile(ttfts, 0.9),
            percentile([r.itl_s for r in self.requests if r.itl_s is not None], 0.9),
        )


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def sample_of(trace: Mapping[str, Any]) -> RequestSample | None:
    """A :class:`RequestSample` from one ``/pdserve/traces`` entry (None: not usable)."""
    arrived = trace.get("arrived_unix_s")
    if arrived is None:
        return None
    ttft = trace.get("ttft_s")
    tokens = int(trace.get("num_tokens") or 0)
    e2e = trace.get("e2e_s")
    itl = None
    if ttft is not None and e2e is not None and tokens >= 2:
        last = trace.get("last_token_s") or e2e
        itl = max(float(last) - float(ttft), 0.0) / (tokens - 1)
    breakdown = trace.get("ttft_breakdown") or {}
    prefill = breakdown.get("prefill_s") if breakdown.get("exact", True) else None
    overhead = float(breakdown.get("router_queue_s") or 0.0) + float(breakdown.get("delivery_s") or 0.0)
    return RequestSample(
        arrived_s=float(arrived),
        prompt_tokens=int(trace.get("num_prompt_tokens") or 0),
        output_tokens=tokens,
        ttft_s=None if ttft is None else float(ttft),
        itl_s=itl,
        prefill_s=None if prefill is None else float(prefill),
        overhead_s=overhead,
        e2e_s=None if e2e is None else float(e2e),
        ok=trace.get("outcome") == "finished",
        max_gap_s=None if trace.get("max_gap_s") is None else float(trace["max_gap_s"]),
    )


def _gauges(metrics_text: str) -> dict[str, dict[str, float]]:
    """``{worker: {gauge name: value}}`` of the router's per-worker gauges."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            worker = s.labels.get("worker")
            if worker is not None and s.name.startswith("pdserve_worker_"):
                out.setdefault(worker, {})[s.name] = s.value
    return out


def parse(
    traces: Sequence[Mapping[str, Any]],
    workers_view: Mapping[str, Any],
    metrics_text: str,
    *,
    now_s: float,
    window_s: float,
    inflight: Sequence[Mapping[str, Any]] = (),
) -> Signals:
    """A :class:`Signals` from the three documents (pure; see the module docstring);
    ``inflight``: the traces of the generations not ended yet."""
    every = [s for s in (sample_of(t) for t in traces) if s is not None]
    running = [s for s in (sample_of(t) for t in inflight) if s is not None]
    gauges = _gauges(metrics_text)
    workers: list[WorkerSignal] = []
    for w in workers_view.get("workers", []):
        g = gauges.get(str(w.get("worker_id")), {})
        total = g.get("pdserve_worker_kv_blocks_total", 0.0)
        free = g.get("pdserve_worker_kv_blocks_free", 0.0)
        rate = g.get("pdserve_worker_prefill_rate_tokens_per_second") or None
        workers.append(
            WorkerSignal(
                worker_id=str(w.get("worker_id")),
                role=str(w.get("role")),
                running=int(g.get("pdserve_worker_running_requests", 0)),
                waiting=int(g.get("pdserve_worker_waiting_requests", 0)),
                kv_usage=(1.0 - free / total) if total > 0 else 0.0,
                prefill_rate_tps=rate,
                draining=bool(w.get("draining")),
                threads=int(w.get("threads") or 0),
            )
        )
    return assemble(every, workers, workers_view.get("deployment") or {}, now_s=now_s, window_s=window_s,
                    inflight=running)


def assemble(
    samples: Sequence[RequestSample],
    workers: Sequence[WorkerSignal],
    deployment: Mapping[str, Any],
    *,
    now_s: float,
    window_s: float,
    inflight: Sequence[RequestSample] = (),
) -> Signals:
    """A :class:`Signals` from plain data: the router's recent ended requests, its workers and
    its deployment view (``/pdserve/workers``' ``deployment``). :func:`parse` calls it on the
    router's answers; the simulator (:mod:`pdserve.sim.elastic`) on its own records."""
    if len(samples) >= FULL_TRACES and min(s.arrived_s for s in samples) > now_s - window_s:
        # the router keeps only its most recent traces: they cover less than the window
        window_s = max(now_s - min(s.arrived_s for s in samples), 1e-3)
    recent = [s for s in samples if s.arrived_s >= now_s - window_s]
    pools = deployment.get("pools") or {}
    actual = (
        Shape.of({p: (pools.get(p) or {}).get("actual", 0) for p in POOLS})
        if pools
        else Shape.of({p: sum(1 for w in workers if w.role == p and not w.draining) for p in POOLS})
    )
    serving = {w.threads for w in workers if not w.draining}
    threads = serving.pop() if len(serving) == 1 else 0  # 0 while the workers' counts differ
    actual = dataclasses.replace(actual, threads=threads)
    targets = Shape.of({p: (pools.get(p) or {}).get("target") for p in POOLS}) if pools else actual
    if targets.workers == 0:
        targets = actual
    targets = dataclasses.replace(targets, threads=int(deployment.get("threads") or threads))
    slots = deployment.get("workers") or []
    rates = [w.prefill_rate_tps for w in workers if w.prefill_rate_tps and w.role in ("prefill", "mixed")]
    return Signals(
        taken_s=now_s,
        window_s=window_s,
        requests=tuple(recent),
        workers=tuple(workers),
        targets=targets,
        actual=actual,
        starting=tuple(
            str(s.get("worker_id")) for s in slots if s.get("state") in ("starting", "restarting", "flipping")
        ),
        failed=tuple(str(s.get("worker_id")) for s in slots if s.get("state") == "failed"),
        supervised=bool(deployment.get("supervised", True)),
        prefill_rate_tps=statistics.median(rates) if rates else None,
        inflight=tuple(s for s in inflight if s.arrived_s >= now_s - window_s),
    )


def read(
    url: str, headers: Mapping[str, str], window_s: float, client: httpx.Client | None = None
) -> Signals:
    """Fetch the three documents from the router at ``url`` and :func:`parse` them."""
    http = client or httpx.Client(timeout=5.0)
    try:
        reply = http.get(f"{url}/pdserve/traces", params={"limit": MAX_TRACES, "inflight": "true"},
                         headers=headers).json()
        traces, inflight = reply["traces"], reply.get("inflight", [])
        view = http.get(f"{url}/pdserve/workers", params={"stats": "false"}, headers=headers).json()
        text = http.get(f"{url}/metrics", headers=headers).text
    finally:
        if client is None:
            http.close()
    return parse(traces, view, text, now_s=time.time(), window_s=window_s, inflight=inflight)
