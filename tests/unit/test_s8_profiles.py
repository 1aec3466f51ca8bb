"""S8's profile placement (``benchmarks/s8_sim_fidelity.py --profile-each``): which deployments are
launched, where each profile goes, which profile a cell is simulated from, and how the report shows it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
import s8_report  # noqa: E402
import s8_resimulate  # noqa: E402
import s8_sim_fidelity as s8  # noqa: E402

from pdserve.config import Role  # noqa: E402
from pdserve.sim.profile import load_profile  # noqa: E402

RESULTS = BENCH / "results"
ONE, TWO = RESULTS / "s8_profile_1thread.json", RESULTS / "s8_profile_2thread.json"


def test_each_cell_is_its_own_deployment_agg_first() -> None:
    args = s8.parse_args(["--configs", "disagg", "agg", "--rates", "0.25", "0.5"])
    assert args.profile_each == "cell"
    assert s8.units(args) == [("agg", [0.25]), ("agg", [0.5]), ("disagg", [0.25]), ("disagg", [0.5])]
    assert s8.s3_args(args, [0.5]).rates == [0.5]  # the deployment runs only its own rate
    config = s8.parse_args(["--configs", "disagg", "agg", "--profile-each", "config"])
    assert s8.units(config) == [("agg", [0.25, 0.5, 0.75]), ("disagg", [0.25, 0.5, 0.75])]
    # reusing the files of an earlier run means one profile per thread count
    assert s8.parse_args(["--reuse-profiles"]).profile_each == "run"


def test_profile_paths_per_cell_and_per_run() -> None:
    assert s8.profile_path("disagg", [0.5], 1, "cell") == s8.PROFILE_DIR / "disagg_0.5_1thread.json"
    assert s8.profile_path("agg", [0.25, 0.5], 2, "config") == s8.PROFILE_DIR / "agg_2thread.json"
    assert s8.profile_path("agg", [0.25], 2, "run") == RESULTS / "s8_profile_2thread.json"
    assert [s8.threads_of(k) for k in ("agg", "agg2", "disagg")] == [2, 1, 1]


def test_a_configuration_needs_only_its_own_profile() -> None:
    one, two = load_profile(ONE, s8.MODEL, 1), load_profile(TWO, s8.MODEL, 2)
    disagg = s8.sim_config("disagg", {1: one}, 256)
    assert [p.role for p in disagg.pools] == [Role.PREFILL, Role.DECODE]
    assert disagg.pools[0].co_location == one.co_location
    agg = s8.sim_config("agg", {2: two}, 256)
    assert agg.pools[0].count == 1 and agg.pools[0].co_location == two.co_location
    with pytest.raises(KeyError):  # the wrong thread count is not silently used
        s8.sim_config("agg2", {2: two}, 256)


def test_report_lists_each_cells_profile() -> None:
    two = load_profile(TWO, s8.MODEL, 2)
    out = json.loads((RESULTS / "s8_sim_fidelity.json").read_text())
    out["settings"]["profile_each"] = "cell"
    summary = s8_report.profile_summary(two, file="benchmarks/results/s8_profiles/x.json", taken_at_s=12.0)
    out["profiles"] = {"agg 0.25": summary}
    text = s8_report.render_doc(out)
    assert "one taken right before each cell" in text
    decode_ms = two.step_model.step_time_s(s8_report.PROBE_SHAPE) * 1e3
    assert 1.0 < decode_ms < 100.0
    assert f"| agg 0.25 | {two.fit['median_abs_rel_error']:.0%}" in text and f"{decode_ms:.2f} ms" in text


def test_resimulate_takes_a_cells_own_profile(tmp_path: Path) -> None:
    fits: dict = {}
    own = {"profiles": {"disagg 0.5": {"file": "benchmarks/results/s8_profile_2thread.json"}}}
    cell = {"config": "disagg", "profile": "disagg 0.5"}
    assert s8_resimulate.cell_profile(own, cell, None, fits) is None  # the shared files: the legacy path
    own["profiles"]["disagg 0.5"]["file"] = "benchmarks/results/s8_profile_1thread.json"
    assert s8_resimulate.cell_profile(own, cell, None, fits) is None
    copy = tmp_path / "disagg_0.5_1thread.json"
    copy.write_text(ONE.read_text())
    own["profiles"]["disagg 0.5"]["file"] = str(copy)  # absolute: REPO_ROOT / it is itself
    profile = s8_resimulate.cell_profile(own, cell, None, fits)
    assert profile is not None and profile.machine["threads"] == 1 and "disagg 0.5" in fits
    assert s8_resimulate.cell_profile(own, {"config": "agg2"}, None, fits) is None  # no profile named


def test_resimulate_can_take_the_runs_first_profile_instead(tmp_path: Path) -> None:
    for name in ("agg2_0.25", "disagg_0.5", "agg_0.25"):
        src = TWO if name.startswith("agg_") else ONE
        (tmp_path / f"{name}.json").write_text(src.read_text())
    run = {"profiles": {
        "agg 0.25": {"file": str(tmp_path / "agg_0.25.json"), "taken_at_s": 10.0},
        "agg2 0.25": {"file": str(tmp_path / "agg2_0.25.json"), "taken_at_s": 200.0},
        "disagg 0.5": {"file": str(tmp_path / "disagg_0.5.json"), "taken_at_s": 900.0}}}
    cell = {"config": "disagg", "profile": "disagg 0.5"}
    fits: dict = {}
    assert s8_resimulate.cell_profile(run, cell, None, fits, first=True) is not None
    assert list(fits) == ["agg2 0.25"]  # the earliest one-thread profile, not agg's two-thread one
    fits.clear()
    s8_resimulate.cell_profile(run, cell, None, fits)
    assert list(fits) == ["disagg 0.5"]
