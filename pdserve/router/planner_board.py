"""The router's side of the SLO planner: its decision history, metrics and early shedding.

The planner (:mod:`pdserve.planner`) runs in the ``pdserve serve`` process and
acts through ``POST /pdserve/scale`` like an operator. After every decision it
reports it here with ``POST /pdserve/planner`` (authenticated by the cluster
secret, as the supervisor's sync): the decision with its inputs and
predictions, and ``shed_above_inflight`` — when the deployment is past what
the budget can give, the number of generations in flight above which new
requests are refused at once (429 with ``Retry-After``; counted in
``pdserve_planner_shed_total``) rather than queued to miss their SLO.

Each report also closes the previous decision: what the window then measured
(TTFT and ITL p90) is stored beside what that decision predicted. The history
is served by ``GET /pdserve/planner``, exported in ``/metrics`` and appended
to the trace log (``{"planner": ...}`` lines).
"""

from __future__ import annotations

import collections
import hmac
import json
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pdserve.router.admission import Admission
from pdserve.router.errors import APIError
from pdserve.router.tracing import Tracer

HISTORY = 500


class PlannerBoard:
    """The planner's reports; applies its shedding limit to ``admission``."""

    def __init__(self, admission: Admission, tracer: Tracer | None = None) -> None:
        self.admission = admission
        self.tracer = tracer
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY)
        self.actions: dict[str, int] = {}

    def report(self, body: dict[str, Any]) -> None:
        """Record one decision and apply its shedding limit."""
        decision = dict(body.get("decision") or {})
        inputs = decision.get("inputs") or {}
        if self.history:
            self.history[-1]["measured_after"] = {
                "ttft_p90_s": inputs.get("measured_ttft_p90_s"),
                "itl_p90_s": inputs.get("measured_itl_p90_s"),
                "attainment": inputs.get("attainment"),
            }
        self.history.append(decision)
        action = str(decision.get("action", "unknown"))
        self.actions[action] = self.actions.get(action, 0) + 1
        limit = body.get("shed_above_inflight")
        self.admission.shed_above = int(limit) if isinstance(limit, int) and limit > 0 else None
        if self.tracer is not None:
            self.tracer.log_record({"planner": decision})

    def view(self) -> dict[str, Any]:
        """``GET /pdserve/planner``: whether a planner reported, its history, the shedding state."""
        return {
            "enabled": bool(self.history),
            "shed_above_inflight": self.admission.shed_above,
            "num_shed": self.admission.num_shed,
            "actions": self.actions,
            "history": list(self.history),
        }


class _PlannerCollector(Collector):
    def __init__(self, board: PlannerBoard) -> None:
        self.board = board

    def collect(self) -> Iterator[Metric]:
        b = self.board
        actions = CounterMetricFamily(
            "pdserve_planner_decisions", "Planner decisions by action", labels=["action"]
        )
        for action, n in sorted(b.actions.items()):
            actions.add_metric([action], n)
        yield actions
        yield CounterMetricFamily(
            "pdserve_planner_shed",
            "Requests refused early (deployment past the budget)",
            value=b.admission.num_shed,
        )
        if not b.history:
            return
        last = b.history[-1]
        target = GaugeMetricFamily("pdserve_planner_target_workers", "The planner's target", labels=["pool"])
        for pool, n in sorted((last.get("target") or {}).items()):
            target.add_metric([pool], n)
        yield target
        yield GaugeMetricFamily(
            "pdserve_planner_over_capacity",
            "1 when no shape in the budget meets the SLOs",
            value=1.0 if last.get("over_capacity") else 0.0,
        )
        figures = GaugeMetricFamily(
            "pdserve_planner_latency_seconds",
            "Predicted (last decision) and measured (the interval after the one before) TTFT p90 and ITL",
            labels=["kind", "metric"],
        )
        predicted = last.get("predicted") or {}
        measured = b.history[-2].get("measured_after", {}) if len(b.history) > 1 else {}
        for kind, values in (("predicted", predicted), ("measured", measured)):
            for metric, key in (
                ("ttft_p90", "ttft_p90_s"),
                ("itl", "itl_s" if kind == "predicted" else "itl_p90_s"),
            ):
                value = values.get(key)
                if isinstance(value, (int, float)):
                    figures.add_metric([kind, metric], float(value))
        yield figures
        inputs = last.get("inputs") or {}
        load = GaugeMetricFamily("pdserve_planner_input", "The planner's last inputs", labels=["name"])
        for name in ("arrival_rate", "prompt_mean", "prompt_p90", "output_mean", "prefill_tps", "step_s"):
            if isinstance(inputs.get(name), (int, float)):
                load.add_metric([name], float(inputs[name]))
        yield load


def add_planner_routes(app: FastAPI, board: PlannerBoard, secret: str, registry: CollectorRegistry) -> None:
    """``POST /pdserve/planner`` (cluster secret), ``GET /pdserve/planner``; metrics into ``registry``."""
    registry.register(_PlannerCollector(board))

    @app.post("/pdserve/planner")
    async def report(request: Request) -> Response:
        given = request.headers.get("x-pdserve-cluster-secret", "")
        if secret and not hmac.compare_digest(given.encode(), secret.encode()):
            return APIError(403, "wrong cluster secret").response()
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return APIError(400, "the body must be a JSON object").response()
        board.report(body)
        return Response('{"ok":true}', media_type="application/json")

    @app.get("/pdserve/planner")
    async def view(limit: int = 100) -> dict[str, Any]:
        out = board.view()
        out["history"] = out["history"][-max(0, min(limit, HISTORY)) :] if limit > 0 else []
        return out
