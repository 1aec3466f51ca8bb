"""The simulated planner choosing each worker's threads: a worker set to two threads steps with the
two-thread step model (synthetic models: one thread 2 ms + 0.1 ms per token, two threads half the
per-token cost)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from test_sim_planner import LINK, SCHED, SIMULATE, TEMPLATES, poisson

from pdserve.cli import main
from pdserve.config import Role
from pdserve.planner.planner import PlannerConfig
from pdserve.planner.signals import Shape
from pdserve.sim.elastic import ElasticConfig, PlannedSimulator
from pdserve.sim.planner_cli import thread_scaling_of
from pdserve.sim.simulator import PoolSpec, SimConfig
from pdserve.sim.step_model import LinearStepModel, StepShape

STEP2 = LinearStepModel((2e-3, 0.5e-4, 0.0, 0.5e-7, 1e-5))
TEMPLATES2 = {
    Role.MIXED: PoolSpec(Role.MIXED, 1, STEP2, 400, link=LINK),
    Role.PREFILL: PoolSpec(Role.PREFILL, 1, STEP2, 400, link=LINK),
    Role.DECODE: PoolSpec(Role.DECODE, 1, STEP2, 400),
}
BY_THREADS = {1: TEMPLATES, 2: TEMPLATES2}


def test_the_table_is_the_step_models_speeds() -> None:
    table = thread_scaling_of(BY_THREADS, 512)
    one, two = table.speeds[1], table.speeds[2]
    assert one.prefill_tps == pytest.approx(512 / (2e-3 + 1e-4 * 512 + 1e-5))
    assert two.prefill_tps / one.prefill_tps == pytest.approx((2e-3 + 0.0512 + 1e-5) / (2e-3 + 0.0256 + 1e-5))
    decode_one = TEMPLATES[Role.MIXED].step_model.step_time_s(StepShape(1, 0, 1, 0.0, 70, 0, 1, 70))
    assert one.step_s == pytest.approx(decode_one)
    assert two.per_seq_s < one.per_seq_s


def test_long_prompts_move_two_workers_to_one_with_two_threads() -> None:
    """600-token prompts one at a time: 62 ms of prefill on one thread against a 50 ms TTFT SLO,
    32 ms on two. The planner takes 1M×2t (the same two cores): the supervisor stops one worker,
    then gives the other two threads, which from then on steps with the two-thread model."""
    cfg = PlannerConfig(ttft_slo_s=0.05, itl_slo_s=0.05, max_workers=2, max_cores=2,
                        thread_scaling=thread_scaling_of(BY_THREADS, 512), down_intervals=2)
    pools = (PoolSpec(Role.MIXED, 2, TEMPLATES[Role.MIXED].step_model, 400, link=LINK),)
    config = SimConfig(pools=pools, scheduler=SCHED, block_size=16, max_model_len=8192, num_layers=4,
                       kv_bytes_per_token=1000, seed=0)
    elastic = ElasticConfig(cfg, TEMPLATES, interval_s=1.0, window_s=4.0, base_threads=1,
                            thread_templates=BY_THREADS)
    sim = PlannedSimulator(config, elastic)
    result = sim.run(poisson([(30.0, 4.0, 600, 4)], seed=5))
    assert Counter(r.error_type for r in result.records) == {None: len(result.records)}
    moved = next(d for d in result.planner if d["action"] != "hold")
    assert moved["target"] == Shape(mixed=1, threads=2).targets() and moved["inputs"]["threads"] == 1
    (worker,) = sim.by_id.values()
    assert worker.threads == 2 and worker.step_model is STEP2
    info = sim.router.registry.get(worker.worker_id)
    assert info is not None and info.threads == 2  # its heartbeats report them
    assert [w.worker_id for w in sim.retired] in (["mixed-0"], ["mixed-1"])  # stopped, not restarted
    # after the change the prompts meet the SLO: the last decisions measure it
    assert result.planner[-1]["inputs"]["attainment"] >= 0.9
    assert result.planner[-1]["current"] == {"prefill": 0, "decode": 0, "mixed": 1, "threads": 2}


def test_thread_profiles_need_a_core_budget_the_planner_chooses_threads_in(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    planner = ["--planner", "slo", "--ttft-ms", "500", "--itl-ms", "30", "--max-workers", "2"]
    assert main([*SIMULATE, *planner, "--thread-profile", f"2={tmp_path / 'p.json'}"]) == 2
    assert "--thread-profile needs --profile, --max-cores" in capsys.readouterr().err
