"""Co-location: a simulated step is stretched by the measured slowdown exactly when another worker of its
host is in a step when it starts; the profile's figure is read, and an older profile's is 1.0."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from pdserve.config import Role, SchedulerConfig
from pdserve.sim.colocation import CoLocation, co_location_of, step_kind
from pdserve.sim.deploy import profile_pool
from pdserve.sim.link import LinkModel
from pdserve.sim.profile import Profile, load_profile, machine_identity
from pdserve.sim.simulator import PoolSpec, SimConfig, SimRequest, Simulator
from pdserve.sim.step_model import LinearStepModel, StepShape

SCHED = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, chunk_size=32)
BASE = LinearStepModel((1.3e-3, 2.1e-5, 0.0, 1.7e-7, 1.1e-5))
CO = CoLocation(prefill=1.5, decode=1.25, other_threads=1, num_samples={"prefill": 10, "decode": 10})
LINK = LinkModel(1e9, 1e-4)


class Recording:
    """The base step model, keeping every shape it was asked for (one call per non-empty step, in order)."""

    def __init__(self) -> None:
        self.shapes: list[StepShape] = []

    def step_time_s(self, shape: StepShape) -> float:
        self.shapes.append(shape)
        return BASE.step_time_s(shape)


def requests() -> list[SimRequest]:
    # overlapping arrivals: the workers are sometimes both computing, sometimes alone
    spec = [(0.0, 70, 6), (0.004, 20, 12), (0.011, 45, 3), (0.05, 9, 20), (0.052, 33, 5), (0.3, 12, 4)]
    return [SimRequest(t, tuple((7 * i + k) % 200 + 3 for k in range(n)), m)
            for i, (t, n, m) in enumerate(spec)]


def run(pools: tuple[PoolSpec, ...]) -> tuple[list[tuple[str, float, float, float, str]], Recording]:
    """Each non-empty step: (worker, start, end, duration / base duration, kind), in the order started."""
    rec = pools[0].step_model
    assert isinstance(rec, Recording)
    config = SimConfig(pools=pools, scheduler=SCHED, block_size=4, max_model_len=512, num_layers=2,
                       kv_bytes_per_token=256, policy="round_robin", disagg_policy="always")
    result = Simulator(config, record_steps=True).run(requests())
    assert result.steps is not None and all(r.e2e_s is not None for r in result.records)
    steps = [s for s in result.steps if s.batch]
    assert len(steps) == len(rec.shapes)
    return [(s.worker_id, s.start_s, s.start_s + s.duration_s, s.duration_s / BASE.step_time_s(shape),
             step_kind(shape)) for s, shape in zip(steps, rec.shapes, strict=True)], rec


def others_busy(steps: list[tuple[str, float, float, float, str]], i: int) -> bool:
    """Another worker's step started before step ``i`` and had not ended when ``i`` started."""
    wid, start = steps[i][0], steps[i][1]
    return any(w != wid and s <= start < e for w, s, e, _, _ in steps[:i])


@pytest.mark.parametrize("shape", ["2 mixed", "1 prefill + 1 decode"])
def test_a_step_is_stretched_exactly_when_another_worker_of_its_host_is_busy(shape: str) -> None:
    rec = Recording()
    pools = {"2 mixed": (PoolSpec(Role.MIXED, 2, rec, 200, co_location=CO),),
             "1 prefill + 1 decode": (PoolSpec(Role.PREFILL, 1, rec, 200, link=LINK, co_location=CO),
                                      PoolSpec(Role.DECODE, 1, rec, 200, co_location=CO))}[shape]
    steps, _ = run(pools)
    stretched = {"prefill": 0, "decode": 0}
    alone = 0
    for i, (_, _, _, ratio, kind) in enumerate(steps):
        if others_busy(steps, i):
            assert ratio == pytest.approx(CO.prefill if kind == "prefill" else CO.decode, rel=1e-9)
            stretched[kind] += 1
        else:
            assert ratio == pytest.approx(1.0, rel=1e-9)
            alone += 1
    assert alone > 0 and stretched["prefill"] > 0 and stretched["decode"] > 0  # every case was exercised


def others_kind(steps: list[tuple[str, float, float, float, str]], i: int) -> str | None:
    """The kind of step the other workers were in when step ``i`` started (prefill wins), None: idle."""
    wid, start = steps[i][0], steps[i][1]
    kinds = {k for w, s, e, _, k in steps[:i] if w != wid and s <= start < e}
    return "prefill" if "prefill" in kinds else "decode" if "decode" in kinds else None


def test_a_decode_step_beside_a_decoding_worker_takes_its_own_figure() -> None:
    co = replace(CO, decode_beside_decode=1.4)
    rec = Recording()
    steps, _ = run((PoolSpec(Role.MIXED, 2, rec, 200, co_location=co),))
    seen: dict[tuple[str, str | None], int] = {}
    for i, (_, _, _, ratio, kind) in enumerate(steps):
        other = others_kind(steps, i)
        expected = (1.0 if other is None else co.prefill if kind == "prefill"
                    else 1.4 if other == "decode" else co.decode)
        assert ratio == pytest.approx(expected, rel=1e-9)
        seen[(kind, other)] = seen.get((kind, other), 0) + 1
    assert seen.get(("decode", "decode")) and seen.get(("decode", "prefill"))  # both cases exercised
    assert CoLocation.from_json(json.loads(json.dumps(co.to_json()))) == co
    assert "decode_beside_decode" not in CO.to_json()  # a profile without it reads as before


def test_no_slowdown_without_a_figure_or_on_separate_hosts() -> None:
    paper, rec = Recording(), Recording()
    for pools in ((PoolSpec(Role.MIXED, 2, paper, 200),),  # a paper pool: one accelerator per worker
                  (PoolSpec(Role.PREFILL, 1, rec, 200, link=LINK, co_location=CO, host="a"),
                   PoolSpec(Role.DECODE, 1, rec, 200, co_location=CO, host="b"))):
        steps, _ = run(pools)
        assert any(others_busy(steps, i) for i in range(len(steps)))  # they did overlap
        assert all(ratio == pytest.approx(1.0, rel=1e-9) for _, _, _, ratio, _ in steps)


def make_profile(co: CoLocation | None) -> Profile:
    return Profile(model="tiny", arch={}, machine=machine_identity(1), engine={},
                   step_model=BASE, fit={}, links={"shm": LINK}, samples=[], co_located=co)


def test_the_profile_keeps_the_figure_and_an_older_profile_has_none(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(make_profile(CO).to_json()))
    warnings: list[str] = []
    loaded = load_profile(path, "tiny", warn=warnings.append)
    assert loaded.co_located == CO and loaded.co_location.prefill == 1.5
    assert not any("co-location" in w for w in warnings)
    assert profile_pool(Role.MIXED, 2, loaded, 100, None).co_location == CO  # what `simulate` builds
    old = make_profile(CO).to_json()
    del old["co_located"]  # as written before the figure existed
    path.write_text(json.dumps(old))
    loaded = load_profile(path, "tiny", warn=warnings.append)
    assert loaded.co_located is None
    assert loaded.co_location.prefill == 1.0 and loaded.co_location.decode == 1.0
    assert any("no co-location figure" in w and "no slowdown" in w for w in warnings)
    assert profile_pool(Role.DECODE, 1, loaded, 100, None).co_location == CoLocation()


def test_the_figure_is_the_median_over_shapes_of_busy_over_idle() -> None:
    def shape(prefill: int, decode: int) -> StepShape:
        return StepShape(prefill + decode, prefill, decode, 0.0, 0, 0, 1)

    p1, p2, d1, d2, only_idle = shape(64, 0), shape(256, 0), shape(0, 1), shape(0, 4), shape(0, 8)
    idle = {p1: [0.1, 0.1, 0.3], p2: [0.4], d1: [0.01], d2: [0.02], only_idle: [1.0]}
    busy = {p1: [0.12, 0.12], p2: [0.52], d1: [0.011, 0.013, 0.011], d2: [0.03]}
    co = co_location_of(idle, busy, 1)
    assert co.prefill == pytest.approx((1.2 + 1.3) / 2) and co.decode == pytest.approx((1.1 + 1.5) / 2)
    assert co.num_samples == {"prefill": 7, "decode": 6} and co.other_threads == 1  # only_idle not counted
    assert CoLocation.from_json(json.loads(json.dumps(co.to_json()))) == co
    measured = replace(co, other_cpu_cores=0.4)  # the host's other processes' CPU meanwhile
    assert CoLocation.from_json(json.loads(json.dumps(measured.to_json()))) == measured
    assert co_location_of({}, {}, 1).prefill == 1.0  # nothing timed: no slowdown
    assert co.decode_beside_decode is None  # B was never only decoding
    # B decoding only: decode shapes' median(decoding) / median(idle); prompt shapes do not count
    beside = co_location_of(idle, busy, 1, {p1: [0.5], d1: [0.012], d2: [0.026], shape(0, 16): [2.0]})
    assert beside.decode_beside_decode == pytest.approx((1.2 + 1.3) / 2)  # (0, 16) was never timed idle
    assert beside.num_samples["decode_beside_decode"] == 4 and beside.decode == co.decode
