"""The router's planner board: history with measured-after figures, metrics, early shedding."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest

from pdserve.router.admission import Admission
from pdserve.router.errors import APIError
from pdserve.router.planner_board import PlannerBoard, add_planner_routes


def decision(action: str, ttft: float, over: bool = False) -> dict:
    return {
        "action": action,
        "target": {"prefill": 1, "decode": 1, "mixed": 0},
        "shape": "1P+1D",
        "inputs": {"arrival_rate": 2.0, "measured_ttft_p90_s": ttft, "measured_itl_p90_s": 0.02},
        "predicted": {"ttft_p90_s": 0.3, "itl_s": 0.02},
        "over_capacity": over,
    }


def make() -> tuple[TestClient, PlannerBoard, Admission, CollectorRegistry]:
    app = FastAPI()
    admission = Admission(None, is_draining=lambda: False)
    board = PlannerBoard(admission)
    registry = CollectorRegistry()
    add_planner_routes(app, board, "s3cret", registry)
    return TestClient(app), board, admission, registry


def test_reports_need_the_cluster_secret() -> None:
    client, board, _, _ = make()
    assert client.post("/pdserve/planner", json={"decision": decision("hold", 0.1)}).status_code == 403
    assert (
        client.post(
            "/pdserve/planner", content=b"[1]", headers={"x-pdserve-cluster-secret": "s3cret"}
        ).status_code
        == 400
    )
    assert not board.history


def test_history_metrics_and_shedding() -> None:
    client, _board, admission, registry = make()
    h = {"x-pdserve-cluster-secret": "s3cret"}
    assert (
        client.post("/pdserve/planner", json={"decision": decision("scale_up", 0.9)}, headers=h).status_code
        == 200
    )
    body = {"decision": decision("hold", 0.25, over=True), "shed_above_inflight": 2}
    assert client.post("/pdserve/planner", json=body, headers=h).status_code == 200
    view = client.get("/pdserve/planner").json()
    assert view["enabled"] and [d["action"] for d in view["history"]] == ["scale_up", "hold"]
    # the first decision is closed by what the next interval measured
    assert view["history"][0]["measured_after"]["ttft_p90_s"] == 0.25
    text = generate_latest(registry).decode()
    assert 'pdserve_planner_decisions_total{action="scale_up"} 1.0' in text
    assert 'pdserve_planner_latency_seconds{kind="measured",metric="ttft_p90"} 0.25' in text
    assert "pdserve_planner_over_capacity 1.0" in text
    # over capacity: the third generation in flight is refused early, with Retry-After, and counted
    tickets = [admission.admit(1), admission.admit(1)]
    with pytest.raises(APIError) as err:
        admission.check()
    assert err.value.status == 429 and "Retry-After" in (err.value.headers or {})
    assert admission.num_shed == 1
    assert "pdserve_planner_shed_total 1.0" in generate_latest(registry).decode()
    # back within capacity: the limit is lifted
    client.post("/pdserve/planner", json={"decision": decision("hold", 0.2)}, headers=h)
    admission.check()
    for t in tickets:
        t.release()
