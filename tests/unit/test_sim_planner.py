"""The SLO planner in the simulator: the real ``decide``, supervisor and router deployment, simulated time.

The scenario mirrors ``tests/e2e/test_slo_planner.py``: a decode-heavy load (short prompts, a few
tokens out) that shifts to a prefill-heavy one (~600-token prompts, one token out, past one worker's
prefill rate) and back. Step times come from a synthetic model (2 ms + 0.1 ms per token).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from pdserve.cli import main
from pdserve.config import Role, SchedulerConfig
from pdserve.planner.planner import PlannerConfig
from pdserve.sim.elastic import START_S, ElasticConfig, PlannedResult, PlannedSimulator
from pdserve.sim.link import LinkModel
from pdserve.sim.simulator import PoolSpec, SimConfig, SimRequest
from pdserve.sim.step_model import LinearStepModel

STEP = LinearStepModel((2e-3, 1e-4, 0.0, 1e-7, 1e-5))
LINK = LinkModel(1e9, 1e-4)
SCHED = SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=32, chunk_size=512)
TEMPLATES = {
    Role.MIXED: PoolSpec(Role.MIXED, 1, STEP, 400, link=LINK),
    Role.PREFILL: PoolSpec(Role.PREFILL, 1, STEP, 400, link=LINK),
    Role.DECODE: PoolSpec(Role.DECODE, 1, STEP, 400),
}


def tokens(seed: int, n: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randrange(3, 30000) for _ in range(n))


def poisson(phases: list[tuple[float, float, int, int]], seed: int = 0) -> list[SimRequest]:
    """Phases of (end s, req/s, prompt tokens, output tokens) with Poisson arrivals."""
    rng, out, t = random.Random(seed), [], 0.0
    for end, rate, prompt, output in phases:
        while (t := t + rng.expovariate(rate)) < end:
            out.append(SimRequest(t, tokens(len(out), prompt + rng.randrange(8)), output))
        t = end
    return out


SHIFT = [(10.0, 2.0, 8, 24), (30.0, 18.0, 600, 1), (70.0, 2.0, 8, 24)]


def simulate(pools: tuple[PoolSpec, ...], requests: list[SimRequest], seed: int = 0, **planner: object
             ) -> tuple[PlannedSimulator, PlannedResult]:
    cfg = PlannerConfig(**{"ttft_slo_s": 0.5, "itl_slo_s": 0.05, "max_workers": 2,  # type: ignore[arg-type]
                           "down_intervals": 2, **planner})
    config = SimConfig(pools=pools, scheduler=SCHED, block_size=16, max_model_len=8192, num_layers=4,
                       kv_bytes_per_token=1000, seed=seed)
    sim = PlannedSimulator(config, ElasticConfig(cfg, TEMPLATES, interval_s=1.0, window_s=4.0))
    return sim, sim.run(requests)


def no_request_lost(sim: PlannedSimulator, result: PlannedResult) -> None:
    assert Counter(r.error_type for r in result.records) == {None: len(result.records)}
    for w in sim.by_id.values():
        assert not w.scheduler.has_unfinished_requests() and not w.scheduler.held, w.worker_id
        assert w.block_manager.stats().num_used_blocks == 0, w.worker_id


def prefill_capable(d: dict[str, object]) -> int:
    target = d["target"]
    assert isinstance(target, dict)
    return int(target["prefill"]) + int(target["mixed"])


def test_a_load_shift_moves_capacity_to_prefill_and_back() -> None:
    sim, result = simulate((PoolSpec(Role.MIXED, 1, STEP, 400, link=LINK),), poisson(SHIFT))
    no_request_lost(sim, result)
    history = result.planner
    by_time = {float(d["at_unix_s"]): d for d in history}
    assert all(prefill_capable(d) == 1 for t, d in by_time.items() if t <= 10)  # decode-heavy: the floor
    up = next(d for d in history if d["action"] in ("scale_up", "reshape"))
    assert 10 < up["at_unix_s"] < 30 and prefill_capable(up) == 2
    down = next(d for d in history if d["action"] == "scale_down")
    assert down["at_unix_s"] > 30 and sum(down["target"].values()) == 1
    assert up["inputs"]["prompt_mean"] > 10 * down["inputs"]["prompt_mean"]
    # the pools followed: the second worker registered start_s after the decision, and left after it
    ready = [(p["t_s"], sum(p["ready"].values())) for p in result.pools]
    up_at = next(t for t, n in ready if n == 2)
    assert up["at_unix_s"] + sim.elastic.start_s <= up_at < up["at_unix_s"] + sim.elastic.start_s + 1
    assert ready[-1][1] == 1 and next(t for t, n in ready if t > up_at and n == 1) >= down["at_unix_s"]
    # the board closed each decision with what the next window measured
    assert all("measured_after" in d for d in history[:-1])
    assert [d.action for d in sim.decisions] == [d["action"] for d in history]


def test_a_reshape_flips_roles_first_and_serves_throughout() -> None:
    """1P+1D under a light load → 1M: the prefill worker flips to mixed (no new process), then the
    decode worker drains and stops; no request fails meanwhile (no 503: a worker serves throughout)."""
    pools = (PoolSpec(Role.PREFILL, 1, STEP, 400, link=LINK), PoolSpec(Role.DECODE, 1, STEP, 400))
    sim, result = simulate(pools, poisson([(20.0, 2.0, 10, 20)], seed=1))
    no_request_lost(sim, result)
    assert [d["shape"] for d in result.planner if d["action"] != "hold"][:2] == ["1M", "1M"]
    assert {w.worker_id: w.role for w in sim.by_id.values()} == {"prefill-0": Role.MIXED}
    assert [w.worker_id for w in sim.retired] == ["prefill-0", "decode-0"]  # the flip's old self, the drain
    assert set(sim.processes) == {"prefill-0", "decode-0"}  # no process started
    assert all(sum(p["ready"].values()) >= 1 for p in result.pools)


def test_zero_traffic_goes_to_the_floor_without_nans() -> None:
    burst = [SimRequest(0.1 * i, tokens(i, 40), 8) for i in range(10)]
    late = [SimRequest(40.0, tokens(99, 40), 8)]  # keeps the run going through 39 quiet seconds
    for floor in (1, 2):
        pools = (PoolSpec(Role.MIXED, 3, STEP, 400, link=LINK),)
        sim, result = simulate(pools, burst + late, max_workers=3, min_workers=floor)
        no_request_lost(sim, result)
        quiet = [d for d in result.planner if d["inputs"]["num_requests"] == d["inputs"]["num_inflight"] == 0]
        assert quiet and all(d["inputs"]["arrival_rate"] == 0 for d in quiet)
        json.dumps(result.planner, allow_nan=False)  # no NaN or infinity anywhere
        assert quiet[-1]["target"] == {"prefill": 0, "decode": 0, "mixed": floor}
        assert sum(result.pools[-1]["ready"].values()) == floor


def test_the_budget_is_respected_past_capacity() -> None:
    overload = poisson([(20.0, 60.0, 600, 4)], seed=2)  # about 4× what three workers prefill
    sim, result = simulate((PoolSpec(Role.MIXED, 1, STEP, 400, link=LINK),), overload, max_workers=3)
    assert all(sum(d["target"].values()) <= 3 for d in result.planner)
    assert all(sum(p["slots"].values()) <= 3 and sum(p["ready"].values()) <= 3 for p in result.pools)
    assert any(d["over_capacity"] for d in result.planner)
    assert max(sum(p["ready"].values()) for p in result.pools) == 3
    # past capacity the router sheds early (429); everything it took finished
    errors = Counter(r.error_type for r in result.records)
    assert set(errors) == {None, "http_429"} and errors["http_429"] > 0
    assert sim.admission.num_shed == errors["http_429"]


def test_the_same_seed_gives_the_same_decisions() -> None:
    def run() -> tuple[list[object], list[object], list[object]]:
        _, result = simulate((PoolSpec(Role.MIXED, 1, STEP, 400, link=LINK),), poisson(SHIFT), seed=3)
        return result.planner, result.pools, [r.to_json() for r in result.records]

    first = run()
    assert first == run() and len(first[0]) > 60


def test_a_scale_down_drains_the_worker_before_it_leaves() -> None:
    """Long outputs are decoding when the planner scales 2M down to 1M: the worker the supervisor
    removes stops getting requests, finishes those it has (none is lost, none fails), then leaves."""
    load = poisson([(10.0, 2.0, 8, 24), (30.0, 18.0, 600, 1), (70.0, 3.0, 8, 400)], seed=4)
    sim, result = simulate((PoolSpec(Role.MIXED, 1, STEP, 400, link=LINK),), load)
    no_request_lost(sim, result)
    down = next(d for d in result.planner if d["action"] == "scale_down")
    (gone,) = sim.retired
    # the router marks it draining at the supervisor's next sync: from then on only one worker is ready
    drain_at = next(p["t_s"] for p in result.pools
                    if p["t_s"] >= down["at_unix_s"] and sum(p["ready"].values()) == 1)
    left_at = next(p["t_s"] for p in result.pools if p["t_s"] > drain_at and "draining" not in p["slots"])
    on_it = [(r.sent_s, r.sent_s + (r.e2e_s or 0)) for r, route in zip(result.records, result.routes,
                                                                      strict=True)
             if gone.worker_id in route.worker_ids]
    in_flight = [(start, end) for start, end in on_it if start < drain_at < end]
    assert in_flight, "nothing was in flight on the removed worker"
    assert all(end <= left_at for _, end in in_flight)  # it left only once they had finished
    assert all(start < drain_at for start, _ in on_it)  # and got nothing new while draining
    assert result.busy_s_by_worker[gone.worker_id] == gone.busy_s > 0  # its work is in the totals


SIMULATE = ["simulate", "--model", "llama-3-8b", "--hardware", "h100", "--mode", "aggregated",
            "--workload", "summarization", "--request-rate", "12", "--num-requests", "600", "--no-progress"]
PLANNER = ["--planner", "slo", "--ttft-ms", "500", "--itl-ms", "30", "--max-workers", "4", "--interval", "5"]


def test_simulate_with_the_planner_writes_its_history_and_pools(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sim.json"
    # one H100 does not prefill 25 summaries/s (it does 12: measured within the SLOs)
    assert main([*SIMULATE, *PLANNER, "--request-rate", "25", "--output", str(out)]) == 0
    assert "planner: " in capsys.readouterr().out
    data = json.loads(out.read_text())
    (run,) = data["planner"]
    history, pools = run["history"], run["pools"]
    keys = {"at_unix_s", "action", "current", "target", "shape", "reason", "inputs", "predicted",
            "candidates", "over_capacity", "given_up"}
    assert history and all(keys <= set(d) for d in history)
    assert [d["at_unix_s"] for d in history[:3]] == [5.0, 10.0, 15.0]
    assert any(d["action"] == "scale_up" for d in history)
    assert pools[0]["ready"] == {"prefill": 0, "decode": 0, "mixed": 1}
    assert max(sum(p["ready"].values()) for p in pools) >= 2
    assert data["config"]["planner"] == "slo" and data["config"]["worker_start_s"] == START_S


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--planner", "slo", "--itl-ms", "30"], "--planner slo needs --ttft-ms and --itl-ms"),
        ([*PLANNER, "--mixed", "5"], "more than the budget of 4"),
        ([*PLANNER, "--flip-s", "-1"], "must be ≥ 0"),
    ],
)
def test_simulate_planner_bad_options(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    assert main([*SIMULATE, *argv]) == 2
    assert message in capsys.readouterr().err
