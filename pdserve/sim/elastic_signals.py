"""What the planner reads in simulated time: the router's three answers, from the simulator's records.

:func:`planner_signals` builds the :class:`~pdserve.planner.signals.Signals` a
``pdserve serve`` planner would read from ``/pdserve/traces`` (the most recent
ended requests and those in flight), ``/metrics`` (each registered worker's
heartbeat load, measured prefill rate and threads) and ``/pdserve/workers``
(the real :class:`~pdserve.router.deployment.Deployment`'s view), with
:func:`~pdserve.planner.signals.assemble`, as the real planner does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pdserve.planner.signals import MAX_TRACES, RequestSample, Signals, WorkerSignal, assemble
from pdserve.router.registry import WorkerInfo

if TYPE_CHECKING:
    from pdserve.sim.elastic import PlannedSimulator

#: The router's trace buffer (``pdserve/router/server.py``: ``keep=1000``).
TRACE_KEEP = 1000


def planner_signals(sim: PlannedSimulator) -> Signals:
    """What the router's three answers would give the planner now."""
    now = sim.now_s
    ended: list[RequestSample] = []
    for end_s, rid in reversed(sim.ends):
        if end_s > now:
            continue
        ended.append(request_sample(sim, rid))
        if len(ended) >= min(TRACE_KEEP, MAX_TRACES):
            break
    ended.reverse()
    workers = [worker_signal(w) for w in sim.router.registry.all()]
    inflight = [  # arrived, not ended: what ``/pdserve/traces?inflight=true`` adds
        RequestSample(rec.sent_s, rec.num_prompt_tokens, rec.num_output_tokens, rec.ttft_s, None, None,
                      0.0, None, False)
        for rec in sim.records.values() if rec.e2e_s is None and rec.error_type is None
    ]
    return assemble(ended, workers, sim.deployment.view(), now_s=now, window_s=sim.elastic.window_s,
                    inflight=inflight)


def request_sample(sim: PlannedSimulator, rid: str) -> RequestSample:
    """One ended request as the router traces it (``signals.sample_of``'s figures)."""
    rec = sim.records[rid]
    tokens, ttft = rec.num_output_tokens, rec.ttft_s
    itl = None
    if ttft is not None and rec.e2e_s is not None and tokens >= 2:
        itl = max(rec.chunk_s[-1] - ttft, 0.0) / (tokens - 1)
    gaps = [b - a for a, b in zip(rec.chunk_s, rec.chunk_s[1:], strict=False)]
    return RequestSample(
        arrived_s=rec.sent_s,
        prompt_tokens=rec.num_prompt_tokens,
        output_tokens=tokens,
        ttft_s=ttft,
        itl_s=itl,
        prefill_s=sim.prefill_times.get(rid),
        # the router's own work before placing it, the request's hop and the first token's
        overhead_s=sim.config.request_overhead_s + 2 * sim.config.hop_s,
        e2e_s=rec.e2e_s,
        ok=rec.error_type is None and rec.e2e_s is not None,
        max_gap_s=max(gaps) if gaps else None,
    )


def worker_signal(w: WorkerInfo) -> WorkerSignal:
    """A registered worker as the router's ``/metrics`` and ``/pdserve/workers`` show it."""
    load = w.load
    total = load.num_total_blocks
    return WorkerSignal(
        worker_id=w.worker_id,
        role=w.role.value,
        running=load.num_running,
        waiting=load.num_waiting + load.num_waiting_for_kv,
        kv_usage=(1.0 - load.num_free_blocks / total) if total > 0 else 0.0,
        prefill_rate_tps=w.perf.prefill_rate_tps or None,
        draining=w.draining,
        threads=w.threads,
    )
