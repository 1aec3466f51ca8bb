"""The served workers' step logs read back: the worker loop's gap (the per-token serving overhead) and
the co-location slowdown of a served prefill + decode pair."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from pathlib import Path

import pytest
from test_sim_serving import OLD, decode, prefill, record

from pdserve.sim.colocation import CoLocation
from pdserve.sim.profile import Profile, load_profile, machine_identity
from pdserve.sim.serving import PER_TOKEN_METHOD, ServingOverhead, derive_overhead
from pdserve.sim.step_model import StepShape
from pdserve.worker.step_log import BUSY_GAP_S, LoggedStep, loop_gap


def test_the_loop_gap_is_read_between_busy_steps_by_the_rows_sampled_before() -> None:
    """1 ms after a one-row step, 1 ms + 0.5 ms per further row after a step of 3; idle pauses,
    prompt chunks that sampled nothing and a backwards clock do not count."""
    steps, t = [], 0.0
    for rows, gap in [(1, 0.001)] * 6 + [(3, 0.002)] * 6 + [(1, BUSY_GAP_S + 0.1), (1, -0.001)]:
        steps.append(LoggedStep(t, 0.01, decode(rows)))
        t += 0.01 + gap
    steps.append(LoggedStep(t, 0.01, StepShape(64, 64, 0, 0.0, 0, 0, 0)))  # a chunk sampling nothing ...
    steps.append(LoggedStep(t + 0.05, 0.01, decode(1)))  # ... then 40 ms: not counted
    got = loop_gap(steps)
    assert got is not None
    assert got.per_token_s == pytest.approx(0.001) and got.per_row_s == pytest.approx(0.0005)
    assert got.num_gaps == 12
    few_rows = loop_gap(steps[:6] + steps[6:8])  # one gap after a multi-row step: no per-row figure
    assert few_rows is not None and few_rows.per_row_s == 0.0
    assert loop_gap(steps[6:12]) is None  # no one-row step followed closely: nothing measured


def test_a_loop_gap_overhead_keeps_the_streams_pace_for_the_reader_only() -> None:
    simulated = [record(0.10, 0.015), record(0.20, 0.016), record(0.30, 0.017)]
    measured = [record(0.13, 0.013), record(0.23, 0.014), record(0.33, 0.015)]  # 2 ms faster per token
    from pdserve.worker.step_log import LoopGap

    got = derive_overhead(measured, simulated, "", gap=LoopGap(0.0004, 0.0001, 50))
    assert (got.per_token_s, got.per_row_s) == (0.0004, 0.0001)  # not the probe process's -2 ms
    assert got.probe_per_token_s == pytest.approx(-0.002) and got.per_token_method == PER_TOKEN_METHOD
    assert got.first_token_s == pytest.approx(0.03 - 0.0004)
    assert ServingOverhead.from_json(json.loads(json.dumps(got.to_json()))) == got
    old = derive_overhead(measured, simulated)  # without a step log: the streams' pace, as before
    assert old.per_token_s == pytest.approx(-0.002) and old.per_token_method == "" and "per_token_method" \
        not in old.to_json()
    assert ServingOverhead.from_json(old.to_json()) == old


def test_served_co_location_compares_steps_beside_a_busy_and_an_idle_partner(tmp_path: Path) -> None:
    """Prompt steps 20 % slower while the decode worker steps, decode steps 5 % slower beside a prompt
    step: the factors are those ratios, whatever the model's own error (here the steps run at 0.9×)."""
    from pdserve.sim.colocation import MIN_SERVED_STEPS, served_co_location

    model = OLD
    chunk, one = prefill(100), decode(1)
    prefill_steps, decode_steps, t = [], [], 0.0
    for i in range(12):  # alternately alone and beside a decoding partner
        busy = i % 2 == 1
        d = 0.9 * model.step_time_s(chunk) * (1.2 if busy else 1.0)
        prefill_steps.append(LoggedStep(t, d, chunk))
        if busy:  # the decode worker steps all along the prompt step
            u = t
            while u < t + d:
                dd = 0.9 * model.step_time_s(one) * 1.05
                decode_steps.append(LoggedStep(u, dd, one))
                u += dd
        t += d + 0.5
        for _ in range(3):  # and decodes alone between prompt steps
            dd = 0.9 * model.step_time_s(one)
            decode_steps.append(LoggedStep(t, dd, one))
            t += dd + 0.001
        t += 0.5
    got = served_co_location(prefill_steps, decode_steps, model, threads=1)
    assert got is not None and got.prefill == pytest.approx(1.2, rel=1e-6)
    assert got.decode == pytest.approx(1.05, rel=0.02)  # the last decode step may stick out of the prompt's
    assert got.num_samples["prefill"] == 12 and got.other_threads == 1 and "probe" in got.method
    few = prefill_steps[: 2 * MIN_SERVED_STEPS - 2]  # fewer than MIN_SERVED_STEPS beside a busy partner
    assert served_co_location(few, decode_steps, model, threads=1) is None
    # a profile uses the served prefill factor and keeps the engine pair's decode factor
    engines = CoLocation(1.05, 1.1, 1, {"prefill": 30, "decode": 54}, "engines")
    profile = Profile(model="tiny", arch={}, machine=machine_identity(1), engine={}, step_model=OLD, fit={},
                      links={}, samples=[], co_located=engines, co_located_served=got)
    assert (profile.co_location.prefill, profile.co_location.decode) == (got.prefill, 1.1)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile.to_json()))
    assert load_profile(path, "tiny", warn=lambda m: None).co_location == profile.co_location
    assert replace(profile, co_located_served=None).co_location == engines  # older profiles: as before


def test_a_step_log_line_cut_short_is_skipped(tmp_path: Path) -> None:
    from pdserve.worker.step_log import read_step_log

    good = json.dumps({"t": 1.0, "s": 0.01, "shape": dataclasses.asdict(decode(1))})
    path = tmp_path / "mixed-0.jsonl"
    path.write_text(f"{good}\n\n{good[:20]}")  # the worker stopped mid-line
    assert read_step_log(path) == [LoggedStep(1.0, 0.01, decode(1))]
