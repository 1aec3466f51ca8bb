"""The HTML report of a bench run (``--plots DIR`` writes ``DIR/report.html``).

One self-contained page (inline SVG drawn by :mod:`pdserve.bench.svg`, inline
CSS, no script, nothing fetched), with the charts of the live dashboard as
the client saw them:

1. the summary table of each run;
2. per run, over time (1-second bins, or coarser for long runs): requests
   finished per second, tokens per second, TTFT p50/p99 and ITL p50/p99
   against the SLO lines, errors per bin, and the server's TTFT breakdown
   (stacked; when pdserve answered with ``--trace-responses``);
3. latency CDFs (TTFT, TPOT, ITL, E2E; one curve per rate), every
   inter-token gap against the time it ended, and, for sweeps, SLO
   attainment and goodput per rate.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from pdserve.bench.metrics import RequestRecord, percentile
from pdserve.bench.report import format_summary, format_sweep
from pdserve.bench.runner import RunResult, SweepResult
from pdserve.bench.svg import Chart, Series, chart

PARTS = ("queue", "prefill", "transfer", "delivery")
PART_COLORS = {"queue": "#f0a020", "prefill": "#2f6fde", "transfer": "#d9468f", "delivery": "#12a38a"}

CSS = """
body { font: 13px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
  margin: 0; background: #f4f6f9; color: #1f2933; }
header { background: #18212c; color: #eef2f6; padding: 12px 20px; font-size: 17px; font-weight: 700; }
main { padding: 12px 20px; }
section { background: #fff; border: 1px solid #e3e8ee; border-radius: 8px; padding: 10px 14px;
  margin-bottom: 14px; }
h2 { font-size: 14px; margin: 2px 0 8px; }
pre { font-size: 12px; overflow-x: auto; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
svg text { font: 11px system-ui, sans-serif; fill: #44505c; }
svg text.ct { font-size: 12.5px; font-weight: 600; fill: #1f2933; }
svg .grid { stroke: #eef1f5; } svg .axis { stroke: #c9d1da; }
svg .ref { stroke: #d64545; stroke-dasharray: 5 4; } svg text.reft { fill: #d64545; }
"""


def _bin_s(run: RunResult) -> float:
    """1-second bins, coarser so that a long run has at most ~120 of them."""
    end = max((r.sent_s + (r.e2e_s or 0.0) for r in run.records), default=1.0)
    return max(1.0, math.ceil(end / 120))


def _bins(values: list[tuple[float, float]], width_s: float, num: int) -> list[list[float]]:
    out: list[list[float]] = [[] for _ in range(num)]
    for t, v in values:
        out[min(int(t // width_s), num - 1)].append(v)
    return out


def _p(values: list[float], q: float) -> float | None:
    return None if not values else 1e3 * percentile(values, q)


def over_time(run: RunResult, label: str) -> list[Chart]:
    """The dashboard's time series, rebuilt from the client's records."""
    width_s = _bin_s(run)
    records: list[RequestRecord] = run.records
    end = max((r.sent_s + (r.e2e_s or 0.0) for r in records), default=width_s)
    num = max(1, math.ceil(end / width_s))
    xs = [(i + 0.5) * width_s for i in range(num)]
    ok = [r for r in records if r.ok]
    done = _bins([(r.sent_s + (r.e2e_s or 0.0), 1.0) for r in ok], width_s, num)
    tokens = _bins(
        [(r.sent_s + t, float(k)) for r in ok for t, k in zip(r.chunk_s, r.chunk_tokens, strict=False)],
        width_s,
        num,
    )
    ttft = _bins([(r.sent_s + r.ttft_s, r.ttft_s) for r in ok if r.ttft_s is not None], width_s, num)
    itl = _bins([(r.sent_s + r.chunk_s[i], g) for r in ok for i, g in _gaps(r)], width_s, num)
    errors = _bins([(r.sent_s, 1.0) for r in records if not r.ok], width_s, num)
    slo = run.summary.slo
    per = f" per {width_s:g} s" if width_s > 1 else ""
    charts = [
        Chart(
            f"Requests finished / s{per} — {label}",
            [Series("req/s", xs, [len(b) / width_s for b in done])],
            "time since start (s)",
            "req/s",
            kind="step",
        ),
        Chart(
            f"Tokens / s — {label}",
            [Series("tokens/s", xs, [sum(b) / width_s for b in tokens], "#0f9d76")],
            "time since start (s)",
            "tokens/s",
            kind="step",
        ),
        Chart(
            f"TTFT — {label}",
            [
                Series("p50", xs, [_p(b, 50) for b in ttft]),
                Series("p99", xs, [_p(b, 99) for b in ttft], "#9db8ec"),
            ],
            "time since start (s)",
            "ms",
            hlines=[(slo["ttft_ms"], "SLO")] if "ttft_ms" in slo else [],
        ),
        Chart(
            f"ITL — {label}",
            [
                Series("p50", xs, [_p(b, 50) for b in itl], "#0f9d76"),
                Series("p99", xs, [_p(b, 99) for b in itl], "#8fd1bf"),
            ],
            "time since start (s)",
            "ms",
            hlines=[(slo["itl_ms"], "SLO")] if "itl_ms" in slo else [],
        ),
        Chart(
            f"Errors{per} — {label}",
            [Series("failed requests", xs, [len(b) for b in errors], "#d64545")],
            "time since start (s)",
            "requests",
            kind="bars",
        ),
    ]
    with_parts = [r for r in ok if r.server_ttft_parts_s and r.ttft_s is not None]
    if with_parts:
        series = []
        for part in PARTS:
            binned = _bins(
                [
                    (r.sent_s + (r.ttft_s or 0.0), r.server_ttft_parts_s[part])  # type: ignore[index]
                    for r in with_parts
                ],
                width_s,
                num,
            )
            series.append(
                Series(part, xs, [1e3 * sum(b) / len(b) if b else 0.0 for b in binned], PART_COLORS[part])
            )
        charts.append(
            Chart(
                f"Server's TTFT breakdown (mean) — {label}", series, "time since start (s)", "ms", kind="area"
            )
        )
    return charts


def _gaps(r: RequestRecord) -> list[tuple[int, float]]:
    return [
        (i, (r.chunk_s[i] - r.chunk_s[i - 1]) / max(1, r.chunk_tokens[i] if i < len(r.chunk_tokens) else 1))
        for i in range(1, len(r.chunk_s))
    ]


def cdfs(runs: list[RunResult]) -> list[Chart]:
    """Latency CDFs, one curve per run."""
    getters = {
        "TTFT": lambda r: [r.ttft_s] if r.ttft_s is not None else [],
        "TPOT": lambda r: [r.tpot_s] if r.tpot_s is not None else [],
        "ITL": lambda r: list(r.itls_s),
        "E2E": lambda r: [r.e2e_s] if r.e2e_s is not None else [],
    }
    charts = []
    for name, get in getters.items():
        series = []
        for run in runs:
            values = sorted(1e3 * v for r in run.records if r.ok and not r.warmup for v in get(r))
            if len(values) > 400:  # enough points to draw the curve
                values = [values[int(i * (len(values) - 1) / 399)] for i in range(400)]
            series.append(
                Series(f"{run.rate:g} req/s", values, [(i + 1) / len(values) for i in range(len(values))])
            )
        charts.append(Chart(f"{name} CDF", series, f"{name} (ms)", "fraction", kind="step", y_max=1.0))
    return charts


def itl_scatter(run: RunResult, label: str) -> Chart:
    """Every inter-token gap against when it ended."""
    points = [(r.sent_s + r.chunk_s[i], 1e3 * g) for r in run.records if r.ok for i, g in _gaps(r)]
    if len(points) > 5000:
        points = points[:: math.ceil(len(points) / 5000)]
    return Chart(
        f"Every inter-token gap — {label}",
        [Series("ITL", [p[0] for p in points], [p[1] for p in points])],
        "time since start (s)",
        "ms",
        kind="scatter",
    )


def attainment(sweep: SweepResult) -> Chart:
    """SLO attainment (%) and goodput per rate."""
    rates = [r.rate for r in sweep.runs]
    return Chart(
        "SLO attainment and goodput vs rate",
        [
            Series("attainment (%)", rates, [100 * r.summary.attainment for r in sweep.runs]),
            Series("goodput (req/s × 10)", rates, [10 * r.summary.goodput for r in sweep.runs], "#f0a020"),
        ],
        "request rate (req/s)",
        "%",
        hlines=[(100 * sweep.target, f"target {100 * sweep.target:g} %")],
    )


def render(runs: list[RunResult], sweep: SweepResult | None = None, title: str = "pdserve bench") -> str:
    """The whole report page."""
    parts = [
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><header>{html.escape(title)}</header><main>"
    ]
    summaries = "\n\n".join(format_summary(run, title) for run in runs)
    if sweep is not None:
        summaries += "\n\n" + format_sweep(sweep)
    parts.append(f"<section><h2>Summary</h2><pre>{html.escape(summaries)}</pre></section>")
    for run in runs:
        label = f"{run.rate:g} req/s"
        charts = [*over_time(run, label), itl_scatter(run, label)]
        parts.append(
            f"<section><h2>Over time at {html.escape(label)}</h2><div class=grid>"
            + "".join(chart(c) for c in charts)
            + "</div></section>"
        )
    more = cdfs(runs) + ([attainment(sweep)] if sweep is not None and len(sweep.runs) > 1 else [])
    parts.append(
        "<section><h2>Distributions</h2><div class=grid>"
        + "".join(chart(c) for c in more)
        + "</div></section>"
    )
    parts.append("</main></body></html>\n")
    return "".join(parts)


def write_html_report(
    out_dir: str | Path, runs: list[RunResult], sweep: SweepResult | None = None, title: str = "pdserve bench"
) -> Path:
    """Write ``report.html`` into ``out_dir``; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.html"
    path.write_text(render(runs, sweep, title), encoding="utf-8")
    return path
