"""``s7_planner.py --merge FILE`` (benchmarks/s7_merge.py): rows of the same load and SLO only."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
import s7_merge  # noqa: E402
from s7_load import ServiceSLO  # noqa: E402

FILE = BENCH / "results" / "s7_planner_surge.json"


def args_of(settings: dict, **changes: object) -> argparse.Namespace:
    return argparse.Namespace(**{**settings, "configs": "planner", **changes})


def test_merge_takes_the_other_rows_with_their_commit() -> None:
    old = json.loads(FILE.read_text())
    slo, rows = s7_merge.earlier(str(FILE), args_of(old["settings"]), None)
    assert slo == ServiceSLO(**old["slo"])
    assert set(rows) == {"agg", "agg2", "disagg"}
    # a row keeps where it was measured: its own record when the file merged it in, else the file's run
    mine = old["configs"]["agg2"]
    assert rows["agg2"]["measured_in"]["commit"] == (mine.get("measured_in") or {}).get(
        "commit", old["machine"]["git"]["commit"])
    assert rows["agg2"]["merged_from"] == (mine.get("merged_from") or str(FILE))
    assert rows["agg2"]["goodput_req_s"] == old["configs"]["agg2"]["goodput_req_s"]
    planner = {**old["configs"]["planner"], "goodput_req_s": 0.5}
    best, ratio = s7_merge.best_static({**rows, "planner": planner})
    # the best static row of the file, whichever it is (the file is re-measured from time to time)
    expected = max(("agg", "agg2", "disagg"), key=lambda c: old["configs"][c]["goodput_req_s"])
    assert best == expected and ratio == round(0.5 / old["configs"][expected]["goodput_req_s"], 3)


def test_merge_refuses_another_load_or_slo() -> None:
    old = json.loads(FILE.read_text())
    with pytest.raises(s7_merge.MergeError, match="chat_rate"):
        s7_merge.earlier(str(FILE), args_of(old["settings"], chat_rate=1.0), None)
    with pytest.raises(s7_merge.MergeError, match="another SLO"):
        s7_merge.earlier(str(FILE), args_of(old["settings"]), ServiceSLO(ttft_ms=500, tpot_ms=40))
    with pytest.raises(s7_merge.MergeError, match="cannot read"):
        s7_merge.earlier("/nonexistent/s7.json", args_of(old["settings"]), None)
