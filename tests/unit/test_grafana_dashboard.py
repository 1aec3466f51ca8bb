"""docs/grafana/pdserve.json parses, and every metric its queries use is one the router or a worker serves."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.config import Role
from pdserve.router.registry import WorkerInfo
from pdserve.router.server import RouterConfig, build_router_app
from pdserve.worker.metrics import WorkerCollector
from pdserve.worker.protocol import WorkerLoad, WorkerStats

DOCS = Path(__file__).resolve().parents[2] / "docs"
DASHBOARD = DOCS / "grafana" / "pdserve.json"
METRIC = re.compile(r"\bpdserve_[a-z0-9_]+\b")


def queries(node: Any) -> list[str]:
    """Every ``expr`` in the dashboard (panels, targets, annotations)."""
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [q for value in node.values() for q in queries(value)]
    if isinstance(node, list):
        return [q for value in node for q in queries(value)]
    return []


def sample_names(exposition: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(exposition) for s in family.samples}


async def router_exposition() -> str:
    """The router's /metrics with one worker registered and one request's worth of labelled series."""
    app, dispatcher = build_router_app(RouterConfig(model="tiny"))
    dispatcher.registry.add(WorkerInfo("decode-0", Role.DECODE, "tiny", 1, "h", 128, 16, 64, None))
    dispatcher.metrics.requests.labels("finished").inc()
    dispatcher.metrics.routed.labels("decode", "decode-0").inc()
    app.state.tracer.parts.labels("queue").observe(0.001)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        await client.get("/metrics")  # counted: the next scrape has the HTTP answers' series
        text = (await client.get("/metrics")).text
    dispatcher.channel.close()
    return text


def worker_exposition() -> str:
    """A worker's /metrics, read from a stand-in for its engine and stats."""
    stats = WorkerStats("prefill-0", "prefill", WorkerLoad(num_total_blocks=8, num_free_blocks=8), 0, 0)
    block_stats = SimpleNamespace(prefix_query_tokens=0, prefix_hit_tokens=0)
    stand_in = SimpleNamespace(
        worker_id="prefill-0",
        role=Role.PREFILL,
        stats=lambda: stats,
        engine=SimpleNamespace(block_manager=SimpleNamespace(stats=lambda: block_stats)),
    )
    registry = CollectorRegistry()
    registry.register(WorkerCollector(stand_in))  # type: ignore[arg-type]
    return generate_latest(registry).decode()


@pytest.mark.anyio
async def test_every_query_uses_metrics_that_exist() -> None:
    board = json.loads(DASHBOARD.read_text())
    exprs = queries(board)
    assert len(exprs) >= 20
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    served = sample_names(await router_exposition()) | sample_names(worker_exposition())
    # Series that appear only once something happened (e.g. a placement) must at least be documented.
    documented = set(re.findall(r"`(pdserve_[a-z0-9_]+)`", (DOCS / "metrics.md").read_text()))
    assert used - served - documented == set(), "queries name metrics that neither router nor worker serves"
    assert len(used & served) >= len(used) - 2  # nearly all checked against the real output
    # The same panels as the live page: rates, latencies with SLO lines, the breakdown, errors, KV.
    titles = " ".join(p["title"] for p in board["panels"]).lower()
    for topic in ("requests / s", "tokens / s", "ttft p50", "itl p50", "ttft breakdown", "429", "kv bytes"):
        assert topic in titles
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    variables = {v["name"] for v in board["templating"]["list"]}
    for expr in exprs:
        for var in re.findall(r"\$([a-z_]+)", expr):
            assert var in variables or var == "__rate_interval", f"{expr} uses undefined ${var}"
