"""Simulated runs in the bench's own result types, so its summary, SLO and goodput code reads them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pdserve.bench.metrics import SLO, RequestRecord, summarize
from pdserve.bench.runner import RunResult
from pdserve.sim.deploy import PlannedRequest
from pdserve.sim.simulator import SimConfig, SimResult, Simulator


def simulate_run(config: SimConfig, planned: Sequence[PlannedRequest], rate: float, slo: SLO | None = None,
                 simulator: Callable[[SimConfig], Simulator] = Simulator) -> tuple[RunResult, SimResult]:
    """Simulate the requests (those the server would refuse get the refusal as their record);
    ``simulator`` builds the simulator (a :class:`~pdserve.sim.elastic.PlannedSimulator` with a planner)."""
    valid = [p for p in planned if p.error is None]
    sim = simulator(config).run([p.request for p in valid])
    by_valid = iter(sim.records)
    records: list[RequestRecord] = []
    for index, p in enumerate(planned):
        if p.error is None:
            record = next(by_valid)
        else:
            record = RequestRecord(index=index, scheduled_s=p.request.arrival_s, sent_s=p.request.arrival_s,
                                   max_tokens=p.request.max_tokens, error_type="http_400", error=p.error)
        record.index = index
        record.warmup = p.warmup
        records.append(record)
    return RunResult(rate=rate, records=records, summary=summarize(records, slo), wall_s=sim.wall_s), sim
