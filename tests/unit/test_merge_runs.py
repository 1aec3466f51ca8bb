"""benchmarks/merge_runs.py: earlier rows only from a comparable run, each with its own commit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from merge_runs import MergeError, earlier_configs

SETTINGS = {"workload": "chat", "rates": [0.5, 1.0], "num_requests": 32, "seed": 0}
SAME = ("workload", "rates", "num_requests", "seed")


def write_run(tmp_path: Path, slo: dict[str, float], settings: dict[str, object]) -> Path:
    run = {"settings": settings, "slo": slo,
           "machine": {"git": {"commit": "abc", "dirty": False}, "date": "2026-12-06T06:00:00"},
           "configs": {"agg": {"goodput_rate_per_s": 2.0}, "planner": {"goodput_rate_per_s": 0.75}}}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(run))
    return path


def test_rows_not_rerun_come_over_with_their_commit(tmp_path: Path) -> None:
    path = write_run(tmp_path, {"ttft_ms": 883, "tpot_ms": 50.7}, SETTINGS)
    rows = earlier_configs(path, SETTINGS, {"ttft_ms": 883, "tpot_ms": 50.7}, SAME, skip={"planner"})
    assert list(rows) == ["agg"]  # the planner is measured again, not carried
    assert rows["agg"]["goodput_rate_per_s"] == 2.0
    assert rows["agg"]["measured_in"]["commit"] == "abc"


@pytest.mark.parametrize("change", [{"slo": {"ttft_ms": 900, "tpot_ms": 50.7}},
                                    {"settings": {**SETTINGS, "rates": [0.5]}}])
def test_a_run_with_other_settings_or_slo_is_refused(tmp_path: Path, change: dict[str, dict]) -> None:
    path = write_run(tmp_path, {"ttft_ms": 883, "tpot_ms": 50.7}, SETTINGS)
    slo = change.get("slo", {"ttft_ms": 883, "tpot_ms": 50.7})
    with pytest.raises(MergeError, match="not the same settings"):
        earlier_configs(path, change.get("settings", SETTINGS), slo, SAME, skip={"planner"})
