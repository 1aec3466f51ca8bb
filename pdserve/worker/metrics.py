"""Prometheus metrics of a worker, served on their own port (``--metrics-port``).

Everything is read from the engine and the KV transport when scraped (from
the HTTP server's thread: only counters and list lengths are read, never
mutated), so the engine loop pays nothing for metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from pdserve.worker.worker import Worker


class WorkerCollector(Collector):
    """Reads one worker's state on every scrape."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def collect(self) -> Iterator[Metric]:
        w = self._worker
        labels = ["worker", "role"]
        values = [w.worker_id, w.role.value]
        stats = w.stats()
        load = stats.load
        bm = w.engine.block_manager.stats()

        def gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, text, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name: str, text: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, text, labels=labels)
            c.add_metric(values, value)
            return c

        yield gauge("pdserve_worker_running_requests", "Requests in the running batch", load.num_running)
        yield gauge(
            "pdserve_worker_waiting_requests", "Requests queued for prefill or blocks", load.num_waiting
        )
        yield gauge(
            "pdserve_worker_waiting_for_kv_requests", "Requests whose KV is arriving", load.num_waiting_for_kv
        )
        yield gauge("pdserve_worker_held_requests", "Requests whose KV is held for a hand-off", load.num_held)
        yield gauge(
            "pdserve_worker_kv_blocks_used", "KV blocks in use", load.num_total_blocks - load.num_free_blocks
        )
        yield gauge(
            "pdserve_worker_kv_blocks_free", "KV blocks free (cached ones included)", load.num_free_blocks
        )
        yield gauge(
            "pdserve_worker_kv_blocks_cached", "KV blocks holding a cached prefix", load.num_cached_blocks
        )
        yield counter(
            "pdserve_worker_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            bm.prefix_query_tokens,
        )
        yield counter(
            "pdserve_worker_prefix_cache_hits",
            "Prompt tokens found in the prefix cache",
            bm.prefix_hit_tokens,
        )
        yield counter(
            "pdserve_worker_prompt_tokens_computed",
            "Prompt tokens this worker computed",
            stats.num_prompt_tokens_computed,
        )
        yield counter("pdserve_worker_steps", "Engine steps run", stats.num_steps)
        yield counter(
            "pdserve_worker_kv_sent_bytes", "KV bytes pushed to decode workers", stats.kv_bytes_sent
        )
        yield counter(
            "pdserve_worker_kv_received_bytes",
            "KV bytes received from prefill workers",
            stats.kv_bytes_received,
        )
        yield counter("pdserve_worker_kv_transfers", "KV hand-offs completed", stats.kv_transfers)
        yield counter("pdserve_worker_kv_events", "Prefix-cache events published", stats.kv_events)
        yield counter(
            "pdserve_worker_kv_event_bytes", "Bytes of KV event batches and snapshots", stats.kv_event_bytes
        )
        yield counter(
            "pdserve_worker_kv_event_cpu_seconds",
            "CPU time spent collecting and encoding KV events",
            stats.kv_event_cpu_s,
        )
        yield counter(
            "pdserve_worker_kv_reservations_deferred",
            "Reservations that found no free blocks (the prefill waits, gated, for room)",
            load.num_deferred_reservations,
        )
        yield counter(
            "pdserve_worker_prefill_gate_waits",
            "Requests that could have started but waited for their decode worker's reservation",
            load.num_gate_waits,
        )
        yield counter(
            "pdserve_worker_prefix_waits",
            "Requests that waited for a prefix another request was computing, rather than compute it too",
            load.num_prefix_waits,
        )
        yield counter(
            "pdserve_worker_kv_snapshots", "Snapshots sent for the router's resyncs", stats.kv_snapshots
        )


def serve_metrics(worker: Worker, port: int = 0, host: str = "127.0.0.1") -> int:
    """Serve the worker's metrics at ``http://host:PORT/metrics`` from a daemon thread.

    Port 0 takes a free one; the port actually bound is returned (and
    announced to the router at registration).
    """
    registry = CollectorRegistry()
    registry.register(WorkerCollector(worker))
    server, _ = start_http_server(port, addr=host, registry=registry)
    return int(server.server_address[1])
