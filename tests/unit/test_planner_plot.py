"""``pdserve bench --plots``' planner plot: pool sizes over time from the router's history."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.bench.planner_plot import planner_history, plot_pools


def test_no_planner_history_from_an_unreachable_router() -> None:
    assert planner_history("http://127.0.0.1:9", {}) == []


def test_plot_of_pool_sizes(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    history = [
        {
            "at_unix_s": 100.0 + i,
            "target": {"prefill": p, "decode": d, "mixed": m},
            "over_capacity": i == 2,
            "inputs": {"arrival_rate": 1.0 + i, "prompt_mean": 100.0 * i},
        }
        for i, (p, d, m) in enumerate([(0, 0, 1), (0, 0, 2), (1, 1, 0), (0, 0, 1)])
    ]
    path = plot_pools(tmp_path, history)
    assert path.exists() and path.stat().st_size > 1000
