"""Reading a run: the summary table on stdout and the JSON result file.

The result file holds ``config`` (every setting of the run), ``machine``
(CPU count and load average: absolute latencies on a shared host drift),
``runs`` (per rate: ``summary`` and, unless left out, every request's
record in milliseconds) and, for sweeps, ``sweep`` (attainment per rate and
the highest rate meeting the target). NaN is written as ``null``.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

from pdserve.bench.metrics import PERCENTILES, Summary
from pdserve.bench.runner import RunResult, SweepResult

_WIDTH = 72


def _fmt(value: float, digits: int = 2) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def format_summary(run: RunResult, title: str = "") -> str:
    """The readable table of one run."""
    s = run.summary
    rate = "inf" if math.isinf(run.rate) else f"{run.rate:g}"
    head = f" {title or 'pdserve bench'}: {s.num_requests} requests @ {rate} req/s "
    lines = [head.center(_WIDTH, "=")]
    rows: list[tuple[str, str]] = [
        ("Successful requests", str(s.num_ok)),
        ("Failed requests", _failures(s)),
        ("Measured window (s)", _fmt(s.duration_s)),
        ("Request throughput (req/s)", _fmt(s.request_throughput)),
        ("Output token throughput (tok/s)", _fmt(s.output_throughput, 1)),
        ("Total token throughput (tok/s)", _fmt(s.total_token_throughput, 1)),
        ("Prompt / output tokens", f"{s.num_prompt_tokens:,} / {s.num_output_tokens:,}"),
    ]
    if s.num_cached_tokens:
        share = 100 * s.num_cached_tokens / s.num_prompt_tokens if s.num_prompt_tokens else 0.0
        rows.append(("Prompt tokens from cache", f"{s.num_cached_tokens:,} ({share:.1f} %)"))
    if s.num_short_outputs:
        rows.append(("Outputs shorter than max_tokens", str(s.num_short_outputs)))
    if s.slo:
        slo = ", ".join(f"{k} ≤ {v:g}" for k, v in s.slo.items())
        rows.append(("SLO", slo))
        rows.append(("SLO attainment", f"{_fmt(100 * s.attainment, 1)} % ({s.num_good}/{s.num_requests})"))
        rows.append(("Goodput (req/s)", _fmt(s.goodput)))
    lag = s.send_lag_ms
    if not math.isnan(lag["p99"]) and lag["p99"] >= 1.0:
        rows.append(("Send lag p50 / p99 (ms)", f"{_fmt(lag['p50'])} / {_fmt(lag['p99'])}"))
    lines += [f"{name + ':':<40}{value:>32}" for name, value in rows]
    columns = ["mean", *(f"p{q}" for q in PERCENTILES)]
    lines.append("-" * _WIDTH)
    lines.append(f"{'(ms)':<12}" + "".join(f"{c:>12}" for c in columns))
    for name, dist in (("TTFT", s.ttft_ms), ("TPOT", s.tpot_ms), ("ITL", s.itl_ms), ("E2E", s.e2e_ms)):
        lines.append(f"{name:<12}" + "".join(f"{_fmt(dist[c]):>12}" for c in columns))
    if s.server_ttft_parts_ms:
        lines.append("server's TTFT breakdown (pdserve_trace):")
        for part, dist in s.server_ttft_parts_ms.items():
            lines.append(f"  {part:<10}" + "".join(f"{_fmt(dist[c]):>12}" for c in columns))
    lines.append("=" * _WIDTH)
    return "\n".join(lines)


def _failures(s: Summary) -> str:
    if not s.num_failed:
        return "0"
    kinds = ", ".join(f"{k}: {v}" for k, v in sorted(s.failures.items()))
    return f"{s.num_failed} ({kinds})"


def format_sweep(sweep: SweepResult) -> str:
    """One line per rate and the verdict."""
    lines = [" sweep ".center(_WIDTH, "=")]
    lines.append(f"{'rate (req/s)':>14}{'attainment':>14}{'goodput':>12}{'TTFT p50':>12}{'TPOT p50':>12}")
    for run in sweep.runs:
        s = run.summary
        lines.append(
            f"{run.rate:>14g}{_fmt(100 * s.attainment, 1) + ' %':>14}{_fmt(s.goodput):>12}"
            f"{_fmt(s.ttft_ms['p50']):>12}{_fmt(s.tpot_ms['p50']):>12}"
        )
    target = f"{100 * sweep.target:g} %"
    if sweep.max_rate is None:
        lines.append(f"No rate reached {target} SLO attainment.")
    else:
        lines.append(f"Highest rate with ≥ {target} SLO attainment: {sweep.max_rate:g} req/s")
        below = [
            r.rate for r in sweep.runs if r.rate < sweep.max_rate and r.summary.attainment < sweep.target
        ]
        if below:
            lines.append(f"(but lower rates {', '.join(f'{r:g}' for r in below)} missed it: noisy machine?)")
    lines.append("=" * _WIDTH)
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """CPU count, affinity and load average when the result was written."""
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_avg_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def run_to_json(run: RunResult, with_requests: bool = True) -> dict[str, Any]:
    """One run as plain data."""
    out: dict[str, Any] = {"rate": run.rate, "wall_s": run.wall_s, "summary": run.summary.to_json()}
    if with_requests:
        out["requests"] = [r.to_json() for r in run.records]
    return out


def result_json(
    config: dict[str, Any],
    runs: list[RunResult],
    sweep: SweepResult | None = None,
    with_requests: bool = True,
) -> dict[str, Any]:
    """The whole result file's content."""
    out: dict[str, Any] = {
        "config": config,
        "machine": machine_info(),
        "runs": [run_to_json(r, with_requests) for r in runs],
    }
    if sweep is not None:
        out["sweep"] = {
            "target": sweep.target,
            "attainment": {f"{k:g}": v for k, v in sweep.attainment.items()},
            "max_rate": sweep.max_rate,
        }
    return out


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: str | Path, result: dict[str, Any]) -> Path:
    """Write the result file (creating its folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(result), indent=1) + "\n")
    return path
