"""PNG plots of a run, when matplotlib is installed (``pip install 'pdserve[bench]'``).

1. ``latency_cdf.png``: CDFs of TTFT, TPOT, ITL and E2E, one curve per rate.
2. ``itl_over_time.png``: every inter-token gap against the time it ended (one
   panel per rate, at most four), to see stalls and warm-up.
3. ``attainment_vs_rate.png`` (sweeps): SLO attainment and goodput per rate,
   with the attainment target.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pdserve.bench.runner import RunResult, SweepResult

MISSING_MESSAGE = "plots need matplotlib: pip install 'pdserve[bench]' (or pip install matplotlib)"


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(run: RunResult) -> str:
    return f"{run.rate:g} req/s"


def write_plots(out_dir: str | Path, runs: list[RunResult], sweep: SweepResult | None = None) -> list[Path]:
    """Write the plots into ``out_dir``; returns their paths. Raises ImportError without matplotlib."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [_latency_cdfs(plt, out, runs), _itl_over_time(plt, out, runs)]
    if sweep is not None and len(sweep.runs) > 1:
        paths.append(_attainment(plt, out, sweep))
    return paths


def _latency_cdfs(plt: Any, out: Path, runs: list[RunResult]) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    getters = {
        "TTFT (ms)": lambda r: [r.ttft_s * 1e3] if r.ttft_s is not None else [],
        "TPOT (ms)": lambda r: [r.tpot_s * 1e3] if r.tpot_s is not None else [],
        "ITL (ms)": lambda r: [t * 1e3 for t in r.itls_s],
        "E2E (ms)": lambda r: [r.e2e_s * 1e3] if r.e2e_s is not None else [],
    }
    for ax, (name, get) in zip(axes.flat, getters.items(), strict=True):
        for run in runs:
            values = sorted(v for r in run.records if r.ok and not r.warmup for v in get(r))
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, ys, where="post", label=_label(run))
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests" if name != "ITL (ms)" else "fraction of tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Latency CDFs")
    fig.tight_layout()
    path = out / "latency_cdf.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _itl_over_time(plt: Any, out: Path, runs: list[RunResult]) -> Path:
    shown = runs[-4:]
    fig, axes = plt.subplots(len(shown), 1, figsize=(11, 3 * len(shown)), squeeze=False)
    for ax, run in zip(axes[:, 0], shown, strict=True):
        xs, ys = [], []
        for r in run.records:
            if not r.ok:
                continue
            for i in range(1, len(r.chunk_s)):
                k = max(1, r.chunk_tokens[i])
                xs.append(r.sent_s + r.chunk_s[i])
                ys.append((r.chunk_s[i] - r.chunk_s[i - 1]) * 1e3 / k)
        ax.scatter(xs, ys, s=2, alpha=0.4)
        ax.set_title(_label(run), fontsize="small")
        ax.set_xlabel("time since start (s)")
        ax.set_ylabel("ITL (ms)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "itl_over_time.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _attainment(plt: Any, out: Path, sweep: SweepResult) -> Path:
    rates = [r.rate for r in sweep.runs]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(rates, [100 * r.summary.attainment for r in sweep.runs], "o-", label="SLO attainment (%)")
    ax.axhline(100 * sweep.target, color="gray", linestyle="--", label=f"target {100 * sweep.target:g} %")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(
        rates, [r.summary.goodput for r in sweep.runs], "s--", color="tab:orange", label="goodput (req/s)"
    )
    twin.set_ylabel("goodput (req/s)")
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower left")
    title = "SLO attainment vs rate"
    if sweep.max_rate is not None:
        title += f" (max rate meeting target: {sweep.max_rate:g} req/s)"
    ax.set_title(title)
    fig.tight_layout()
    path = out / "attainment_vs_rate.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
