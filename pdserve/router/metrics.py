"""Prometheus metrics of the router: requests, latencies, routing, recovery, KV and workers.

Names follow Prometheus conventions (``_total`` counters, ``_seconds``
histograms, base units). Inter-token gaps are measured where the router sees
the tokens; time to first token, its breakdown and end-to-end latency come
from the request traces (:mod:`pdserve.router.tracing`), from arrival at the
router. Counters of recovery and per-worker load are read from the dispatcher when
scraped, so they are always current.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from pdserve.router.dispatcher import Dispatcher

# No ``*_created`` series: they double the exposition and scrapers derive resets themselves.
disable_created_metrics()

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_GAP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class RouterMetrics:
    """The router's metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pdserve_requests", "Requests that ended, by outcome", ["outcome"], registry=r
        )
        self.prompt_tokens = Counter("pdserve_prompt_tokens", "Prompt tokens of ended requests", registry=r)
        self.generation_tokens = Counter(
            "pdserve_generation_tokens", "Tokens delivered to clients", registry=r
        )
        # Time to first token (and its breakdown) and end-to-end latency are observed by the
        # tracer (:mod:`pdserve.router.tracing`), into this same registry.
        self.itl = Histogram(
            "pdserve_inter_token_latency_seconds",
            "Gap between token messages of a request",
            buckets=TOKEN_GAP_BUCKETS_S,
            registry=r,
        )
        self.kv_transfer = Histogram(
            "pdserve_kv_transfer_duration_seconds",
            "KV transfer duration as the decode worker measured it (first byte to the done notice)",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.routed = Counter(
            "pdserve_routing_decisions", "Attempts placed on a worker", ["role", "worker"], registry=r
        )

    def attach(self, dispatcher: Dispatcher) -> None:
        """Export the dispatcher's live counters and worker loads on every scrape."""
        self.registry.register(_DispatcherCollector(dispatcher))

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)


class _DispatcherCollector(Collector):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    def collect(self) -> Iterator[Metric]:
        d = self._dispatcher
        c = d.counters
        recovery = CounterMetricFamily(
            "pdserve_recovery", "Recovery actions of the router, by kind", labels=["kind"]
        )
        for kind, value in (
            ("retry", c.num_retries),
            ("migration", c.num_migrations),
            ("fallback_prefill", c.num_fallback_prefills),
            ("kv_timeout", c.num_kv_timeouts),
            ("failed", c.num_failed),
            ("worker_lost", c.num_workers_lost),
        ):
            recovery.add_metric([kind], value)
        yield recovery
        yield CounterMetricFamily(
            "pdserve_kv_transfer_bytes", "KV bytes decode workers reported received", value=c.kv_bytes
        )
        yield GaugeMetricFamily(
            "pdserve_requests_inflight", "Requests dispatched, not ended", value=d.num_inflight
        )
        workers = GaugeMetricFamily("pdserve_workers", "Registered workers by role", labels=["role"])
        roles: dict[str, int] = {}
        for w in d.registry.all():
            roles[w.role.value] = roles.get(w.role.value, 0) + 1
        for role, count in sorted(roles.items()):
            workers.add_metric([role], count)
        yield workers
        load = {
            name: GaugeMetricFamily(
                f"pdserve_worker_{name}", f"Worker {text} (last heartbeat)", labels=["worker", "role"]
            )
            for name, text in (
                ("running_requests", "running requests"),
                ("waiting_requests", "queued requests"),
                ("kv_blocks_free", "free KV blocks"),
                ("kv_blocks_total", "KV blocks"),
                ("kv_blocks_cached", "prefix-cached KV blocks"),
                ("held_requests", "KV held for hand-off"),
                ("threads", "torch threads"),
            )
        }
        for w in d.registry.all():
            labels = [w.worker_id, w.role.value]
            load["running_requests"].add_metric(labels, w.load.num_running)
            load["waiting_requests"].add_metric(labels, w.load.num_waiting + w.load.num_waiting_for_kv)
            load["kv_blocks_free"].add_metric(labels, w.load.num_free_blocks)
            load["kv_blocks_total"].add_metric(labels, w.load.num_total_blocks)
            load["kv_blocks_cached"].add_metric(labels, w.load.num_cached_blocks)
            load["held_requests"].add_metric(labels, w.load.num_held)
            load["threads"].add_metric(labels, w.threads)
        yield from load.values()
        yield from _routing_metrics(d)


def _routing_metrics(d: Dispatcher) -> Iterator[Metric]:
    """Placement decisions, the cache index, and each worker's cache and measured rates."""
    placer = d.placer
    decisions = CounterMetricFamily(
        "pdserve_placements", "Placements by reason (remote or local prefill, and why)", labels=["reason"]
    )
    for reason, count in sorted(placer.decisions.items()):
        decisions.add_metric([reason], count)
    yield decisions
    yield CounterMetricFamily(
        "pdserve_placements_balanced",
        "Placements the load bound moved off a worker holding more of the prompt (--balance-factor)",
        value=placer.num_balanced,
    )
    yield GaugeMetricFamily(
        "pdserve_kv_index_blocks", "Confirmed (worker, block) entries", value=placer.index.size
    )
    yield GaugeMetricFamily(
        "pdserve_kv_index_speculative_blocks",
        "Speculative (worker, block) entries of recent decisions",
        value=placer.index.num_speculative,
    )
    per_worker: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
        "hit": GaugeMetricFamily(
            "pdserve_worker_prefix_cache_hit_rate",
            "Prompt tokens found in its prefix cache",
            labels=["worker", "role"],
        ),
        "blocks": GaugeMetricFamily(
            "pdserve_kv_index_worker_blocks", "Blocks the index holds for it", labels=["worker", "role"]
        ),
        "events": CounterMetricFamily(
            "pdserve_kv_events", "Prefix-cache events applied to the index", labels=["worker", "role"]
        ),
        "rate": GaugeMetricFamily(
            "pdserve_kv_events_per_second",
            "Prefix-cache events over the last 10 s",
            labels=["worker", "role"],
        ),
        "resyncs": CounterMetricFamily(
            "pdserve_kv_index_resyncs",
            "Snapshots asked for (gap, new epoch, contradiction)",
            labels=["worker", "role"],
        ),
        "prefill_rate": GaugeMetricFamily(
            "pdserve_worker_prefill_rate_tokens_per_second",
            "Measured prefill rate",
            labels=["worker", "role"],
        ),
        "queued": GaugeMetricFamily(
            "pdserve_worker_queued_prefill_tokens",
            "Prompt tokens sent to it, not yet computed",
            labels=["worker", "role"],
        ),
        "deferred": CounterMetricFamily(
            "pdserve_kv_reservations_deferred",
            "Reservations a decode worker deferred for lack of room (prefills throttled)",
            labels=["worker", "role"],
        ),
        "gate": CounterMetricFamily(
            "pdserve_prefill_gate_waits",
            "Prefills that waited for their decode worker's reservation with compute free",
            labels=["worker", "role"],
        ),
    }
    for w in d.registry.all():
        labels = [w.worker_id, w.role.value]
        view = placer.worker_view(w)
        for key, value in (
            ("hit", view.prefix_hit_rate),
            ("blocks", view.index_blocks),
            ("events", view.events),
            ("rate", view.events_per_s),
            ("resyncs", view.resyncs),
            ("prefill_rate", view.prefill_rate_tps or 0.0),
            ("queued", view.queued_prefill_tokens),
            ("deferred", w.load.num_deferred_reservations),
            ("gate", w.load.num_gate_waits),
        ):
            per_worker[key].add_metric(labels, value)
    yield from per_worker.values()
