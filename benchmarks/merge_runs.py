"""Carry configurations over from an earlier run of the same benchmark settings.

Re-running one configuration of a long sweep (S3's planner after a planner
fix) should not cost the whole sweep, and must not pass an old row off as
new: the earlier rows are taken only when the settings that decide their
figures are equal (workload, rates, requests per rate, seed, the SLO), and
each row keeps the commit and date of the run that measured it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MergeError(ValueError):
    """The earlier run is not comparable with this one."""


def provenance(machine: dict[str, Any]) -> dict[str, Any]:
    """The commit and date a row was measured at."""
    git = machine.get("git") or {}
    return {"commit": git.get("commit"), "dirty": git.get("dirty"), "date": machine.get("date"),
            "command": machine.get("command")}


def earlier_configs(
    path: Path, settings: dict[str, Any], slo: dict[str, Any], same: tuple[str, ...], skip: set[str]
) -> dict[str, dict[str, Any]]:
    """The configurations of the run in ``path`` that this run does not measure (those in ``skip``).

    ``same`` names the settings that must be equal in both runs; the SLO's
    thresholds must be equal too. Raises :class:`MergeError` when they are not.
    """
    earlier = json.loads(path.read_text())
    differ = [k for k in same if earlier.get("settings", {}).get(k) != settings.get(k)]
    for k in ("ttft_ms", "tpot_ms"):
        if earlier.get("slo", {}).get(k) != slo.get(k):
            differ.append(f"slo.{k}")
    if differ:
        raise MergeError(f"{path}: not the same settings as this run ({', '.join(differ)}); "
                         "give --slo with the earlier run's thresholds and the same workload options")
    rows = {}
    for key, row in earlier.get("configs", {}).items():
        if key not in skip:
            rows[key] = {**row, "measured_in": row.get("measured_in") or provenance(earlier["machine"])}
    return rows
