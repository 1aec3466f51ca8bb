"""What a planner decision records as its inputs: the window's load and measured figures, and
the speeds it was predicted with (``/pdserve/planner``, ``/metrics``, the trace log)."""

from __future__ import annotations

from typing import Any

from pdserve.planner.predict import Speeds
from pdserve.planner.signals import Signals


def decision_inputs(
    sig: Signals,
    speeds: Speeds,
    ttft_slo_s: float,
    itl_slo_s: float,
    ttft_per_token_s: float = 0.0,
    max_gap_s: float | None = None,
) -> dict[str, Any]:
    """The figures a decision records as its ``inputs`` (JSON-ready; the window's measured
    attainment under ``attainment``, None without requests; ``max_gap_s``: the stall SLO it judges)."""
    lengths, outputs = sig.prompt_lengths, sig.output_lengths

    def mean(xs: list[int]) -> float:
        return round(sum(xs) / len(xs), 1) if xs else 0.0

    ttft90, itl90 = sig.measured_p90(ttft_slo_s)
    return {
        "arrival_rate": round(sig.arrival_rate, 4),
        "threads": sig.actual.threads,
        "num_requests": len(sig.requests),
        "num_inflight": len(sig.inflight),
        "prompt_mean": mean(lengths),
        "prompt_p90": sorted(lengths)[int(0.9 * (len(lengths) - 1))] if lengths else 0,
        "output_mean": mean(outputs),
        "prefill_tps": round(speeds.prefill_tps, 1),
        "prefill_per_pair_s": speeds.prefill_per_pair_s,
        "step_s": round(speeds.step_s, 6),
        "per_seq_s": round(speeds.per_seq_s, 6),
        "measured_ttft_p90_s": ttft90,
        "measured_itl_p90_s": itl90,
        "queued": sum(w.waiting for w in sig.workers),
        "attainment": sig.attainment(ttft_slo_s, itl_slo_s, ttft_per_token_s, max_gap_s),
    }
