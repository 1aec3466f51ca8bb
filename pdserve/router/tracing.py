"""Lifecycle tracing: each generation's events, and where its time to first token went.

One :class:`RequestTrace` per generation (a prompt × one of its ``n``
samples), on the router's clock, counted from the request's arrival:

1. ``arrived`` — the HTTP request reached the router (before its body was read).
2. ``routed`` — an attempt was placed on workers (again after a retry), with
   the placement's ``reason`` (remote or local prefill, and why) and the
   prompt tokens the index predicted cached on the computing worker.
3. ``prefill_start`` / ``prefill_end`` / ``kv_transfer_start`` — on the
   worker that prefilled; the worker reports durations on its own clock
   (:class:`~pdserve.worker.protocol.PrefillTiming`), which are placed on the
   router's timeline assuming the two message hops took equally long.
4. ``kv_reserved`` — the decode worker reserved blocks for the KV and the
   router relayed their ids to the prefill worker (disaggregated).
   ``first_token`` — the router received the first token.
5. ``first_token_delivered`` — the router handed it to the HTTP response.
6. ``kv_transfer_end`` — the decode worker reported the whole KV in (and
   ``kv_transfer_start``, estimated from its transfer time, if the push
   began only after the first token).
7. ``finished`` or ``aborted`` — with the reason; token messages are
   counted, not logged one by one.

Every event is recorded once (the first ``first_token`` wins over a retry's).
The TTFT breakdown (:class:`TTFTBreakdown`) splits arrival → delivery into
queue, prefill, transfer and delivery; its parts add up to the TTFT, and the
clocks of router and workers never need to agree.

A :class:`Tracer` receives completed traces: it feeds the Prometheus
histograms, keeps the most recent ones for ``GET /pdserve/traces``, appends
them to a JSON-lines log if asked, and says whether responses carry them
(the ``pdserve_trace`` extension field, off by default).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import IO, Any

from prometheus_client import CollectorRegistry, Histogram

from pdserve.router.metrics import LATENCY_BUCKETS_S  # (importing it also turns off *_created series)
from pdserve.worker.protocol import PrefillTiming

logger = logging.getLogger(__name__)

TTFT_PARTS = ("queue", "prefill", "transfer", "delivery")
PART_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass(frozen=True)
class TTFTBreakdown:
    """Where the time from arrival to the first token handed to the client went (seconds).

    The four parts add up to ``ttft_s``:

    * ``queue_s`` = ``router_queue_s`` (reading, parsing, tokenising, and
      earlier attempts that failed) + ``worker_queue_s`` (on the worker:
      setting the request up, then waiting for a step).
    * ``prefill_s``: the worker computing the prompt.
    * ``transfer_s``: the prefill waiting for its KV to be pushed to the
      decode worker (0 when aggregated; the rest of the transfer overlaps).
    * ``delivery_s`` = ``network_s`` (both message hops between router and
      worker, and the worker's reporting) + ``router_delivery_s`` (turning
      the token into output).

    ``exact`` is False when the worker sent no timing: then ``prefill_s``
    holds everything between dispatch and the first token.
    """

    ttft_s: float
    queue_s: float
    prefill_s: float
    transfer_s: float
    delivery_s: float
    router_queue_s: float
    worker_queue_s: float
    network_s: float
    router_delivery_s: float
    exact: bool = True

    def parts(self) -> dict[str, float]:
        """The four parts by name."""
        return {
            "queue": self.queue_s,
            "prefill": self.prefill_s,
            "transfer": self.transfer_s,
            "delivery": self.delivery_s,
        }


class RequestTrace:
    """The events of one generation, in seconds since it arrived at the router."""

    def __init__(
        self, request_id: str, arrived_s: float | None = None, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        """``arrived_s``: arrival on ``clock`` (now when None)."""
        self.request_id = request_id
        self.clock = clock
        self._t0 = clock() if arrived_s is None else arrived_s
        self.arrived_unix_s = time.time() - (clock() - self._t0)
        self.events: list[tuple[str, float, dict[str, Any] | None]] = [("arrived", 0.0, None)]
        self.num_attempts = 0
        self.dispatched_s: float | None = None
        self.first_token_s: float | None = None
        self.timing: PrefillTiming | None = None
        self.delivered_s: float | None = None
        self.num_tokens = 0
        self.num_prompt_tokens = 0  # set by the app (the planner reads it)
        self.num_token_messages = 0
        self.last_token_s: float | None = None
        self.max_gap_s: float | None = None  # the longest wait between two token messages
        self.ended_s: float | None = None
        self.outcome: str | None = None
        self.on_end: Callable[[RequestTrace], None] | None = None

    def now(self) -> float:
        """Seconds since arrival."""
        return self.clock() - self._t0

    def _add(self, name: str, at_s: float, attrs: dict[str, Any] | None = None) -> None:
        self.events.append((name, at_s, attrs))

    # -- what the dispatcher sees -------------------------------------------------------

    def routed(
        self,
        attempt: int,
        prefill_worker: str | None,
        decode_worker: str | None,
        decision: dict[str, Any] | None = None,
    ) -> None:
        """An attempt was placed on workers (``decision``: why, e.g. the placement's reason)."""
        self.num_attempts += 1
        self.dispatched_s = self.now()
        workers: dict[str, Any] = {
            "attempt": attempt,
            "prefill_worker": prefill_worker,
            "decode_worker": decode_worker,
        }
        workers.update(decision or {})
        self._add("routed", self.dispatched_s, workers)

    def first_token(self, worker_id: str, timing: PrefillTiming | None) -> None:
        """A message with the first token, or with the prefill's timing, arrived from ``worker_id``.

        The first such message is the first token. The prefilling worker's timing
        may come on a later one: the decode worker can relay the first token to
        the router before the prefill worker's own message arrives.
        """
        now = self.now()
        if self.first_token_s is None:
            self.first_token_s = now
            self._add("first_token", now, {"worker": worker_id})
        if timing is None or self.timing is not None or self.dispatched_s is None:
            return
        self.timing = timing
        hop = max(now - self.dispatched_s - timing.span_s, 0.0) / 2
        received = self.dispatched_s + hop
        start = received + timing.queue_s
        worker = {"worker": worker_id}
        # (min: never after the receipt, whatever the clocks' resolution)
        self._add("prefill_start", min(start, now), worker)
        if timing.kv_push_start_s is not None:
            self._add("kv_transfer_start", min(received + timing.kv_push_start_s, now), worker)
        self._add("prefill_end", min(start + timing.prefill_s + timing.kv_push_s, now), worker)

    def kv_reserved(self, num_blocks: int) -> None:
        """The decode worker reserved the KV's blocks; the router relayed where to the prefill worker."""
        self._add("kv_reserved", self.now(), {"blocks": num_blocks})

    def kv_received(self, num_bytes: int, transfer_s: float) -> None:
        """The decode worker has the whole KV (``transfer_s``: first byte → done, on its clock).

        A transfer that started only after the first token was reported (the
        decode worker's blocks became known after the prefill) has no
        ``kv_transfer_start`` from the prefill worker: it is placed
        ``transfer_s`` before this receipt, marked ``estimated``.
        """
        now = self.now()
        if not any(name == "kv_transfer_start" for name, _, _ in self.events):
            self._add("kv_transfer_start", max(now - transfer_s, 0.0), {"estimated": True})
        self._add("kv_transfer_end", now, {"bytes": num_bytes, "transfer_s": transfer_s})

    # -- what the HTTP side sees ------------------------------------------------------

    def tokens(self, num_tokens: int) -> None:
        """A token message reached the response; the first one ends the time to first token."""
        if num_tokens <= 0:
            return
        now = self.now()
        self.num_tokens += num_tokens
        self.num_token_messages += 1
        if self.last_token_s is not None:
            self.max_gap_s = max(self.max_gap_s or 0.0, now - self.last_token_s)
        self.last_token_s = now
        if self.delivered_s is None:
            self.delivered_s = now
            self._add("first_token_delivered", now)

    @property
    def breakdown(self) -> TTFTBreakdown | None:
        """The TTFT breakdown once the first token was delivered (None before)."""
        return None if self.delivered_s is None else self._breakdown(self.delivered_s)

    def _breakdown(self, delivered_s: float) -> TTFTBreakdown:
        dispatched = self.dispatched_s if self.dispatched_s is not None else 0.0
        received = self.first_token_s if self.first_token_s is not None else delivered_s
        router_delivery = delivered_s - received
        t = self.timing
        if t is None:
            return TTFTBreakdown(
                ttft_s=delivered_s, queue_s=dispatched, prefill_s=received - dispatched, transfer_s=0.0,
                delivery_s=router_delivery, router_queue_s=dispatched, worker_queue_s=0.0, network_s=0.0,
                router_delivery_s=router_delivery, exact=False,
            )
        # What the worker did not account for as queue, prefill or push: hops and its reporting.
        network = (received - dispatched) - (t.queue_s + t.prefill_s + t.kv_push_s)
        return TTFTBreakdown(
            ttft_s=delivered_s,
            queue_s=dispatched + t.queue_s,
            prefill_s=t.prefill_s,
            transfer_s=t.kv_push_s,
            delivery_s=network + router_delivery,
            router_queue_s=dispatched,
            worker_queue_s=t.queue_s,
            network_s=network,
            router_delivery_s=router_delivery,
        )

    def end(self, outcome: str, reason: str | None = None) -> None:
        """The generation ended (``finished``, ``aborted`` or ``error``); runs ``on_end`` once."""
        if self.ended_s is not None:
            return
        self.ended_s = self.now()
        self.outcome = outcome
        self._add("finished" if outcome == "finished" else outcome, self.ended_s, {"reason": reason})
        if self.on_end is not None:
            self.on_end(self)

    # -- export -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view: ids, outcome, TTFT breakdown, counts and the ordered events."""
        events = sorted(self.events, key=lambda e: e[1])
        breakdown = self.breakdown
        return {
            "request_id": self.request_id,
            "arrived_unix_s": round(self.arrived_unix_s, 6),
            "outcome": self.outcome,
            "attempts": self.num_attempts,
            "ttft_s": None if breakdown is None else _r(breakdown.ttft_s),
            "ttft_breakdown": None
            if breakdown is None
            else {k: (v if isinstance(v, bool) else _r(v)) for k, v in asdict(breakdown).items()},
            "num_tokens": self.num_tokens,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_token_messages": self.num_token_messages,
            "last_token_s": None if self.last_token_s is None else _r(self.last_token_s),
            "max_gap_s": None if self.max_gap_s is None else _r(self.max_gap_s),
            "e2e_s": None if self.ended_s is None else _r(self.ended_s),
            "events": [{"event": name, "t_s": _r(at), **(attrs or {})} for name, at, attrs in events],
        }


def _r(seconds: float) -> float:
    return round(seconds, 6)


class Tracer:
    """Collects ended traces: metrics, the recent ones, an optional log, the response flag.

    Args:
        registry: where the histograms go (None: no metrics).
        in_responses: put each choice's trace in its response (``pdserve_trace``).
        keep: how many recent traces ``recent`` returns at most.
        log_path: append every ended trace to this JSON-lines file.
        clock: the clock of its traces (arrival times passed to ``start`` are on it).
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        in_responses: bool = False,
        keep: int = 256,
        log_path: str | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.in_responses = in_responses
        self.clock = clock
        self._recent: collections.deque[RequestTrace] = collections.deque(maxlen=keep)
        # started, not ended (by id()); weak: a trace dropped without ending does not stay here
        self._active: weakref.WeakValueDictionary[int, RequestTrace] = weakref.WeakValueDictionary()
        self._log: IO[str] | None = open(log_path, "a", buffering=1) if log_path else None  # noqa: SIM115
        self._log_lock = threading.Lock()
        self.ttft: Histogram | None = None
        self.parts: Histogram | None = None
        self.e2e: Histogram | None = None
        #: Called with every ended trace, on the event loop (keep them cheap: e.g. the dashboard's
        #: sampler only queues the trace for its next tick).
        self.listeners: list[Callable[[RequestTrace], None]] = []
        if registry is not None:
            self.ttft = Histogram(
                "pdserve_time_to_first_token_seconds",
                "Arrival at the router to the first token handed to the response",
                buckets=LATENCY_BUCKETS_S, registry=registry,
            )
            self.parts = Histogram(
                "pdserve_ttft_breakdown_seconds",
                "Time to first token by part: queue, prefill, transfer (prefill waiting on the KV push), "
                "delivery",
                ["part"], buckets=PART_BUCKETS_S, registry=registry,
            )
            self.e2e = Histogram(
                "pdserve_e2e_request_latency_seconds",
                "Arrival at the router to the end of a generation that finished",
                buckets=LATENCY_BUCKETS_S, registry=registry,
            )

    def start(self, request_id: str, arrived_s: float | None = None) -> RequestTrace:
        """A new trace whose end reaches this tracer (``arrived_s`` on its clock; None: now)."""
        trace = RequestTrace(request_id, arrived_s, self.clock)
        trace.on_end = self._ended
        self._active[id(trace)] = trace
        return trace

    def inflight(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The traces of generations not ended yet, oldest first (``limit``: the newest ones)."""
        traces = sorted(list(self._active.values()), key=lambda t: t.arrived_unix_s)
        if limit is not None:
            traces = traces[-limit:] if limit > 0 else []
        return [t.to_dict() for t in traces]

    def recent(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The most recent ended traces, newest last."""
        traces = list(self._recent)
        if limit is not None:
            traces = traces[-limit:] if limit > 0 else []
        return [t.to_dict() for t in traces]

    def log_record(self, record: dict[str, Any]) -> None:
        """Append one non-trace record (a planner decision) to the log, if there is one."""
        if self._log is not None:
            with self._log_lock:
                try:
                    self._log.write(json.dumps(record, separators=(",", ":")) + "\n")
                except OSError:
                    logger.warning("trace log write failed", exc_info=True)

    def close(self) -> None:
        """Close the log file."""
        if self._log is not None:
            self._log.close()
            self._log = None

    def _ended(self, trace: RequestTrace) -> None:
        self._active.pop(id(trace), None)
        self._recent.append(trace)
        for listener in self.listeners:
            listener(trace)
        b = trace.breakdown
        if b is not None and self.ttft is not None and self.parts is not None:
            self.ttft.observe(b.ttft_s)
            for part, seconds in b.parts().items():
                self.parts.labels(part).observe(seconds)
        if trace.outcome == "finished" and trace.ended_s is not None and self.e2e is not None:
            self.e2e.observe(trace.ended_s)
        if self._log is not None:
            line = json.dumps(trace.to_dict(), separators=(",", ":"))
            with self._log_lock:
                try:
                    self._log.write(line + "\n")
                except OSError:
                    logger.warning("trace log write failed", exc_info=True)
