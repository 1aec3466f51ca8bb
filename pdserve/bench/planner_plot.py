"""The SLO planner's pool sizes over time against the load (``pdserve bench --plots``).

Read from the router's ``GET /pdserve/planner`` (docs/planner.md) after the
run; nothing is plotted when the deployment runs no planner.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx


def planner_history(root_url: str, headers: Mapping[str, str]) -> list[dict[str, Any]]:
    """The planner's decisions (oldest first); empty when there is none or the router says nothing."""
    try:
        reply = httpx.get(
            f"{root_url}/pdserve/planner", params={"limit": 500}, headers=dict(headers), timeout=10
        )
        view = reply.json() if reply.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        return []
    return list(view.get("history") or []) if view.get("enabled") else []


def plot_pools(
    out_dir: str | Path, history: Sequence[Mapping[str, Any]], name: str = "planner_pools.png"
) -> Path:
    """Write the plot: target workers per pool (steps) and the observed arrival rate and prompt length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = float(history[0].get("at_unix_s", 0.0)) if history else 0.0
    times = [float(d.get("at_unix_s", 0.0)) - t0 for d in history]
    fig, (pools, load) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    for pool, color in (("prefill", "tab:blue"), ("decode", "tab:orange"), ("mixed", "tab:green")):
        pools.step(
            times,
            [(d.get("target") or {}).get(pool, 0) for d in history],
            where="post",
            label=pool,
            color=color,
        )
    over = [t for t, d in zip(times, history, strict=True) if d.get("over_capacity")]
    if over:
        pools.plot(over, [0] * len(over), "rx", label="over capacity")
    pools.set_ylabel("target workers")
    pools.legend(loc="upper left")
    pools.set_title("SLO planner: pool sizes against the load")
    inputs = [d.get("inputs") or {} for d in history]
    load.plot(times, [i.get("arrival_rate", 0.0) for i in inputs], color="black", label="arrivals (req/s)")
    load.set_ylabel("req/s")
    load.set_xlabel("seconds since the first decision")
    twin = load.twinx()
    twin.plot(
        times, [i.get("prompt_mean", 0.0) for i in inputs], color="tab:purple", label="mean prompt (tokens)"
    )
    twin.set_ylabel("mean prompt tokens")
    load.legend(loc="upper left")
    twin.legend(loc="upper right")
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
