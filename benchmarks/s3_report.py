"""S3's reading of the runs: goodput per configuration, the same requests under other SLOs, the tables.

:mod:`s3_goodput` runs the deployments and the load; this module turns its
:class:`RunResult` objects into the result file's entries and the printed
table. Goodput here is a *rate*: the highest request rate of the sweep at
which at least the attainment target (90%) of the requests met the SLO.
"""

from __future__ import annotations

import math
from typing import Any

from pdserve.bench.metrics import SLO, RequestRecord, Summary
from pdserve.bench.runner import RunResult
from pdserve.bench.workload import LengthDist

PLANNER_NOTE = "not measured in this run: add `planner` to --configs (pdserve serve --planner slo)"
SLO_SENSITIVITY = (0.5, 2.0)  # the SLO scaled by these factors, re-judged on the same requests
DISTURBED_CORES = 0.25  # other processes kept this much of a core busy during a rate: flagged


def ms(summary: Summary, metric: str, stat: str) -> float:
    """One statistic (``p50``, ``min`` …) of a summary's distribution in ms (NaN when it has no samples)."""
    return float(getattr(summary, metric)[stat])


def length_spec(dist: LengthDist) -> str:
    """A length distribution written the way ``--input-len`` takes it."""
    if dist.kind == "fixed":
        return f"{dist.a:g}"
    if dist.kind == "uniform":
        return f"uniform:{dist.a:g}:{dist.b:g}"
    return f"lognormal:{dist.a:g}:{dist.b:g}:{dist.lo}:{dist.hi}"


def fmt(x: float | None, digits: int = 0) -> str:
    """A number for the table; ``-`` when missing."""
    return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def goodput_rate(attainment: dict[float, float], target: float) -> float | None:
    """The highest rate whose attainment reaches the target (None: no rate did)."""
    meeting = [rate for rate, a in attainment.items() if a >= target]
    return max(meeting) if meeting else None


def rejudge(runs: list[RunResult], slo: SLO, target: float) -> dict[str, Any]:
    """Goodput of the same requests under another SLO; ``capped`` when the highest rate that ran met it."""
    attainment = {}
    for run in runs:
        measured: list[RequestRecord] = [r for r in run.records if not r.warmup]
        attainment[run.rate] = sum(slo.met(r) for r in measured) / len(measured) if measured else math.nan
    rate = goodput_rate(attainment, target)
    return {"slo": slo.given, "attainment": {str(k): v for k, v in attainment.items()},
            "goodput_rate_per_s": rate, "capped": bool(runs) and rate == runs[-1].rate}


def sensitivity(runs: list[RunResult], slo: SLO, target: float) -> list[dict[str, Any]]:
    """Goodput under the SLO scaled by each factor of ``SLO_SENSITIVITY`` (both thresholds alike)."""
    def scaled(f: float) -> SLO:
        return SLO(**{k: v * f for k, v in slo.given.items()})

    return [{"scale": f, **rejudge(runs, scaled(f), target)} for f in SLO_SENSITIVITY]


def unloaded_report(summary: Summary) -> dict[str, Any]:
    """Typical requests one at a time: best (the figure the SLO scales) and median TTFT and TPOT."""
    return {"num_requests": summary.num_requests, "num_failed": summary.num_failed,
            "ttft_best_ms": ms(summary, "ttft_ms", "min"), "ttft_p50_ms": ms(summary, "ttft_ms", "p50"),
            "tpot_best_ms": ms(summary, "tpot_ms", "min"), "tpot_p50_ms": ms(summary, "tpot_ms", "p50"),
            "ttft_ms": summary.ttft_ms, "tpot_ms": summary.tpot_ms}


def rate_report(run: RunResult, cpu: dict[str, float]) -> dict[str, Any]:
    """Summary of one rate, the CPU each process used, and each measured request in brief (to re-judge
    it under another SLO)."""
    s = run.summary
    return {
        "rate_per_s": run.rate, "num_requests": s.num_requests, "num_good": s.num_good,
        "cpu_cores_used": cpu, "other_processes_cores": cpu.get("other_processes", math.nan),
        "disturbed": cpu.get("other_processes", 0.0) >= DISTURBED_CORES,
        "attainment": s.attainment, "num_failed": s.num_failed, "failures": s.failures,
        "ttft_p50_ms": ms(s, "ttft_ms", "p50"), "ttft_p90_ms": ms(s, "ttft_ms", "p90"),
        "tpot_p50_ms": ms(s, "tpot_ms", "p50"), "tpot_p90_ms": ms(s, "tpot_ms", "p90"),
        "good_requests_per_s": s.goodput, "request_throughput_per_s": s.request_throughput,
        "output_tokens_per_s": s.output_throughput, "wall_s": run.wall_s,
        "summary": s.to_json(),
        "requests": [
            {"sent_s": round(r.sent_s, 3), "prompt": r.num_prompt_tokens, "output": r.num_output_tokens,
             "ttft_ms": None if r.ttft_s is None else round(r.ttft_s * 1e3, 1),
             "tpot_ms": None if (t := r.tpot_s) is None else round(t * 1e3, 2), "error": r.error_type}
            for r in run.records if not r.warmup
        ],
    }


def print_unloaded(u: dict[str, Any], prompt_tokens: int, output_tokens: int) -> None:
    print(f"    unloaded ({prompt_tokens}-token prompt, {output_tokens} out, {u['num_requests']} one at a "
          f"time): TTFT best/p50 {fmt(u['ttft_best_ms'])}/{fmt(u['ttft_p50_ms'])} ms, TPOT best/p50 "
          f"{fmt(u['tpot_best_ms'], 1)}/{fmt(u['tpot_p50_ms'], 1)} ms, failed {u['num_failed']}", flush=True)


def print_rate(key: str, run: RunResult, cpu: dict[str, float]) -> None:
    r = rate_report(run, cpu)
    print(f"    {key} rate {run.rate:g}/s: attainment {fmt(100 * r['attainment'])}% "
          f"({r['num_good']}/{r['num_requests']}), TTFT p50/p90 {fmt(r['ttft_p50_ms'])}/"
          f"{fmt(r['ttft_p90_ms'])} ms, TPOT p50/p90 {fmt(r['tpot_p50_ms'], 1)}/{fmt(r['tpot_p90_ms'], 1)} "
          f"ms, failed {r['num_failed']}, {run.wall_s:.0f} s; cores used: machine {fmt(cpu['machine'], 2)}, "
          f"other processes {fmt(r['other_processes_cores'], 2)}", flush=True)


def print_table(results: dict[str, dict[str, Any]], slo: SLO, target: float) -> None:
    """Per configuration and rate: attainment, TTFT and TPOT p50/p90; then each goodput."""
    header = (f"{'config':<8}{'rate/s':>7}{'n':>4}{'attain':>8}{'TTFT p50':>10}{'TTFT p90':>10}"
              f"{'TPOT p50':>10}{'TPOT p90':>10}{'good/s':>8}{'failed':>8}{'other':>7}")
    print(f"\nSLO: TTFT ≤ {slo.ttft_ms:g} ms and TPOT ≤ {slo.tpot_ms:g} ms; goodput = highest rate with "
          f"≥ {target:.0%} attainment\n{header}\n{'-' * len(header)}")
    for key, res in results.items():
        for r in res["rates"]:
            print(f"{key:<8}{r['rate_per_s']:>7g}{r['num_requests']:>4}{fmt(100 * r['attainment']) + '%':>8}"
                  f"{fmt(r['ttft_p50_ms']):>10}{fmt(r['ttft_p90_ms']):>10}{fmt(r['tpot_p50_ms'], 1):>10}"
                  f"{fmt(r['tpot_p90_ms'], 1):>10}{fmt(r['good_requests_per_s'], 2):>8}{r['num_failed']:>8}"
                  f"{fmt(r['other_processes_cores'], 2):>7}{' *' if r['disturbed'] else ''}")
        if res["skipped_rates"]:
            print(f"{key:<8} rates {', '.join(f'{x:g}' for x in res['skipped_rates'])}: skipped (attainment "
                  "fell below the stop threshold at two lower rates)")
    print("times in ms; good/s: requests that met the SLO per second of the measured window; other: cores "
          "that processes outside the benchmark kept busy during the rate (of 2);\n"
          f"*: disturbed (other ≥ {DISTURBED_CORES} cores): another job on the machine took CPU from this "
          "rate\n")
    for key, res in results.items():
        u = res["unloaded"]
        scaled = ", ".join(f"{s['scale']:g}× SLO {fmt(s['goodput_rate_per_s'], 2)}"
                           f"{'+' if s['capped'] else ''}" for s in res["slo_sensitivity"])
        print(f"goodput {key:<7}{fmt(res['goodput_rate_per_s'], 2):>5} req/s  (unloaded TTFT "
              f"{fmt(u['ttft_best_ms'])} ms, TPOT {fmt(u['tpot_best_ms'], 1)} ms; the same requests under "
              f"{scaled})")
    print("('-': no rate met the target; '+': the highest rate that ran met it, a higher one was not tried)")
    if "planner" not in results:
        print(f"planner's configuration: {PLANNER_NOTE}")
