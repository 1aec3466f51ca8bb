"""The planner's lines in ``pdserve status`` (from the router's ``GET /pdserve/planner``)."""

from __future__ import annotations

import time
from typing import Any


def _ms(value: object) -> str:
    return f"{1e3 * value:.0f}" if isinstance(value, (int, float)) else "-"


def planner_lines(view: dict[str, Any] | None, last: int = 5) -> list[str]:
    """The last decisions: when, action, shape, predicted vs measured TTFT p90 / ITL, why."""
    if not view or not view.get("enabled"):
        return []
    shed = view.get("shed_above_inflight")
    lines = [
        "",
        f"planner: {view.get('num_shed', 0)} requests shed early"
        + (f" (refusing above {shed} in flight)" if shed else ""),
        f"{'time':<10}{'action':<11}{'shape':<10}{'req/s':>7}{'pred TTFT':>10}{'meas TTFT':>10}"
        f"{'pred ITL':>9}{'meas ITL':>9}  reason (ms)",
    ]
    for d in view.get("history", [])[-last:]:
        pred = d.get("predicted") or {}
        meas = d.get("measured_after") or {}
        lines.append(
            f"{time.strftime('%H:%M:%S', time.localtime(d.get('at_unix_s', 0))):<10}"
            f"{d.get('action', '?'):<11}"
            f"{d.get('shape', '?'):<10}{(d.get('inputs') or {}).get('arrival_rate', 0):>7.2f}"
            f"{_ms(pred.get('ttft_p90_s')):>10}{_ms(meas.get('ttft_p90_s')):>10}"
            f"{_ms(pred.get('itl_s')):>9}{_ms(meas.get('itl_p90_s')):>9}  {d.get('reason', '')}"
        )
    return lines
