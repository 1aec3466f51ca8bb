"""The simulator's calibrated terms: the multi-row step cost and the measured serving overhead."""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from dataclasses import replace
from pathlib import Path

import pytest

from pdserve.bench.metrics import RequestRecord
from pdserve.config import Role, SchedulerConfig
from pdserve.sim.cli import add_profile_parser, engine_argv
from pdserve.sim.colocation import CoLocation
from pdserve.sim.link import LinkModel
from pdserve.sim.profile import Profile, load_profile, machine_identity
from pdserve.sim.serving import (
    LOADED_ESTIMATOR,
    MIN_UNQUEUED,
    PER_TOKEN_METHOD,
    ServedStepModel,
    ServingOverhead,
    apply_serving,
    derive_loaded,
    derive_overhead,
    simulate_alone,
)
from pdserve.sim.simulator import PoolSpec, SimConfig, SimRequest, Simulator
from pdserve.sim.step_model import LinearStepModel, StepShape, fit_linear

OLD = LinearStepModel((0.01, 1e-4, 0.0, 1e-6, 1e-4))  # a profile of the first form (5 coefficients)


def decode(batch: int, context: int = 100) -> StepShape:
    return StepShape(batch, 0, batch, 0.0, batch * context, 0, batch)


def prefill(n: int) -> StepShape:
    return StepShape(n, n, 0, n * (n + 1) / 2, 0, 0, 1)


def test_multi_row_cost_is_paid_by_every_step_but_a_single_decode() -> None:
    model = LinearStepModel((0.01, 1e-4, 0.0, 1e-6, 1e-4, 0.007))
    base = LinearStepModel(model.coefficients[:5])
    assert base.coefficients[5] == 0.0  # the first form: the term is 0
    assert model.step_time_s(decode(1)) == pytest.approx(base.step_time_s(decode(1)))
    for shape in (decode(2), decode(16), prefill(64)):
        assert model.step_time_s(shape) == pytest.approx(base.step_time_s(shape) + 0.007)
    with pytest.raises(ValueError, match="6 coefficients"):
        LinearStepModel((1.0, 2.0))


def test_fit_recovers_a_jump_between_one_row_and_several() -> None:
    true = LinearStepModel((0.014, 4e-4, 1e-7, 3e-6, 5e-4, 0.007))
    shapes = [decode(b, c) for b in (1, 2, 4, 16) for c in (64, 512)] + [prefill(n) for n in (32, 128, 512)]
    fit = fit_linear(shapes, [true.step_time_s(s) for s in shapes])
    assert fit.median_abs_rel_error < 1e-6
    assert fit.model.coefficients[5] == pytest.approx(0.007, rel=1e-4)


def test_an_older_profile_loads_with_warnings_and_no_new_terms(tmp_path: Path) -> None:
    profile = Profile(model="tiny", arch={}, machine=machine_identity(1), engine={}, step_model=OLD, fit={},
                      links={"shm": LinkModel(5e9, 1e-4)}, samples=[])
    data = profile.to_json()
    del data["step_model"]["coefficients_s"]["multi_row"]  # as written before the term existed
    assert "serving_overhead" not in data
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    warnings: list[str] = []
    loaded = load_profile(path, "tiny", warn=warnings.append)
    assert loaded.step_model == OLD and loaded.step_model.coefficients[5] == 0.0
    assert loaded.serving is None and loaded.request_overhead_s is None
    assert loaded.sim_step_model is loaded.step_model
    assert any("multi_row" in w and "taken as 0" in w for w in warnings)
    assert any("no serving overhead" in w for w in warnings)


def test_a_profile_with_serving_overhead_round_trips(tmp_path: Path) -> None:
    serving = ServingOverhead(0.025, 0.002, 0.0005, num_requests=10, method="how")
    profile = Profile(model="tiny", arch={}, machine=machine_identity(1), engine={}, step_model=OLD, fit={},
                      links={}, samples=[], serving=serving, co_located=CoLocation())
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile.to_json()))
    warnings: list[str] = []
    loaded = load_profile(path, "tiny", warn=warnings.append)
    # a profile taken before the loaded figure: it loads, with a warning, and uses the idle figure
    assert loaded.serving == serving and loaded.request_overhead_s == 0.025
    assert len(warnings) == 1 and "older than the loaded serving overhead" in warnings[0]
    assert loaded.sim_step_model == ServedStepModel(OLD, 0.002, 0.0005)
    # a loaded figure of the queue-biased estimator before LOADED_ESTIMATOR: warned about, not used
    biased = replace(serving, first_token_loaded_s=0.09)
    path.write_text(json.dumps(replace(profile, serving=biased).to_json()))
    warnings.clear()
    loaded = load_profile(path, "tiny", warn=warnings.append)
    assert loaded.serving == biased and not loaded.serving.loaded_usable
    assert loaded.request_overhead_s == 0.025  # the idle figure
    assert len(warnings) == 1 and "queueing biases" in warnings[0]
    current = replace(serving, first_token_loaded_s=0.04, loaded_estimator=LOADED_ESTIMATOR)
    handoff = ServingOverhead(0.03, 0.001, first_token_loaded_s=0.07, loaded_estimator=LOADED_ESTIMATOR)
    path.write_text(json.dumps(replace(profile, serving=current, serving_handoff=handoff).to_json()))
    warnings.clear()
    loaded = load_profile(path, "tiny", warn=warnings.append)
    assert loaded.serving == current and not warnings
    assert loaded.request_overhead_s == 0.04  # the loaded figure, not the idle one
    assert loaded.handoff_overhead_s == pytest.approx(0.03)  # 0.07 - 0.04: loaded figures both sides


def test_served_step_model_adds_per_token_once_and_per_row_for_every_further_row() -> None:
    served = apply_serving(OLD, ServingOverhead(0.0, 0.002, 0.0005))
    assert served.step_time_s(decode(1)) == pytest.approx(OLD.step_time_s(decode(1)) + 0.002)
    assert served.step_time_s(decode(4)) == pytest.approx(OLD.step_time_s(decode(4)) + 0.002 + 3 * 0.0005)
    assert served.step_time_s(StepShape(64, 64, 0, 0.0, 0, 0, 0)) == OLD.step_time_s(
        StepShape(64, 64, 0, 0.0, 0, 0, 0))  # a prompt chunk that samples nothing
    assert apply_serving(OLD, None) is OLD and apply_serving(OLD, ServingOverhead(0.01, 0.0)) is OLD
    assert apply_serving(OLD, ServingOverhead(0.0, 0.0, 0.001)) == ServedStepModel(OLD, 0.0, 0.001)


def record(ttft_s: float, itl_s: float, n: int = 11) -> RequestRecord:
    return RequestRecord(index=0, ttft_s=ttft_s, e2e_s=ttft_s + itl_s * (n - 1), num_output_tokens=n,
                         num_prompt_tokens=50)


def test_the_typical_gap_between_tokens_ignores_one_long_step() -> None:
    steady = RequestRecord(index=0, ttft_s=0.1, e2e_s=0.19, num_output_tokens=4,
                           chunk_s=[0.1, 0.12, 0.14, 0.19], chunk_tokens=[1, 1, 1, 1])
    simulated = RequestRecord(index=0, ttft_s=0.1, e2e_s=0.13, num_output_tokens=4,
                              chunk_s=[0.1, 0.11, 0.12, 0.13], chunk_tokens=[1, 1, 1, 1])
    got = derive_overhead([steady], [simulated])
    assert got.per_token_s == pytest.approx(0.01)  # gaps 20, 20, 50 ms vs 10 ms: the median, not the mean


def test_overhead_is_the_median_gap_between_served_and_simulated() -> None:
    simulated = [record(0.10, 0.015), record(0.20, 0.016), record(0.30, 0.017)]
    measured = [record(0.13, 0.017), record(0.23, 0.018), record(0.50, 0.030)]  # one outlier
    got = derive_overhead(measured, simulated)
    assert got.per_token_s == pytest.approx(0.002)
    assert got.first_token_s == pytest.approx(0.03 - 0.002)  # the first token pays per_token too
    assert got.num_requests == 3 and got.per_row_s == 0.0  # no batch served
    batch_sim = [record(0.4, 0.020)] * 4
    batch = [record(0.45, 0.020 + 0.002 + 3 * 0.001)] * 4  # each further row of 4 adds 1 ms
    with_batch = derive_overhead(measured, simulated, "", batch, batch_sim, 4)
    assert with_batch.per_row_s == pytest.approx(0.001) and with_batch.per_token_s == pytest.approx(0.002)
    assert with_batch.num_requests == 7
    # served faster than simulated: the per-token figure keeps its sign (the step model corrected down),
    # the figure before the first token is clamped at 0
    faster = derive_overhead(simulated, measured)
    assert faster.per_token_s == pytest.approx(-0.002) and faster.first_token_s == 0.0
    served = apply_serving(OLD, faster)
    assert served.step_time_s(decode(1)) == pytest.approx(OLD.step_time_s(decode(1)) - 0.002)
    assert apply_serving(OLD, ServingOverhead(0.0, -1.0)).step_time_s(decode(1)) == 0.0  # never below 0
    with pytest.raises(ValueError, match="measured records"):
        derive_overhead(measured[:1], simulated)
    with pytest.raises(ValueError, match="no request"):
        derive_overhead([RequestRecord(index=0)], [RequestRecord(index=0)])


def test_simulated_alone_and_with_overhead_differ_by_exactly_the_overhead() -> None:
    sched = SchedulerConfig(chunk_size=64)
    served = [record(0.0, 0.0, 8), record(0.0, 0.0, 5)]
    served[1].num_prompt_tokens = 150
    alone = simulate_alone(served, (PoolSpec(Role.MIXED, 1, OLD, 256),), sched, 16, 2048, 256)
    assert [r.num_output_tokens for r in alone] == [8, 5]
    overhead = ServingOverhead(0.02, 0.003, 0.001)
    pools = (PoolSpec(Role.MIXED, 1, apply_serving(OLD, overhead), 256),)
    config = SimConfig(pools=pools, scheduler=sched, enable_prefix_caching=False, max_model_len=2048,
                       hop_s=0.0, request_overhead_s=overhead.first_token_s)
    requests = [SimRequest(1000.0 * i, tuple(range(3, 3 + r.num_prompt_tokens)), r.num_output_tokens)
                for i, r in enumerate(served)]
    with_overhead = Simulator(config).run(requests).records
    batch = [record(0.0, 0.0, 6) for _ in range(4)]
    plain = (PoolSpec(Role.MIXED, 1, OLD, 256),)
    batch_alone = simulate_alone(batch, plain, sched, 16, 2048, 256, together=True)
    batch_with = simulate_alone(batch, pools, sched, 16, 2048, 256, together=True)  # (no request overhead)
    # the derivation inverts the simulator: the overhead it finds is the one put in
    got = derive_overhead(with_overhead, alone, "", batch_with, batch_alone, 4)
    assert got.first_token_s == pytest.approx(0.02) and got.per_token_s == pytest.approx(0.003)
    assert got.per_row_s == pytest.approx(0.001)


def test_profile_engine_options_become_worker_arguments() -> None:
    parser = argparse.ArgumentParser()
    add_profile_parser(parser.add_subparsers())
    args = parser.parse_args(["profile", "--model", "bench-50m", "--chunk-size", "256", "--no-prefix-caching",
                              "--threads", "2"])
    assert engine_argv(args) == ["--no-prefix-caching", "--chunk-size", "256"]  # the parser's order


def test_hand_off_overheads_land_on_decode_workers_and_hand_offs_only(tmp_path: Path) -> None:
    local, handoff = ServingOverhead(0.01, 0.001), ServingOverhead(0.05, 0.004)
    profile = Profile(model="tiny", arch={}, machine=machine_identity(1), engine={}, step_model=OLD, fit={},
                      links={}, samples=[], serving=local, serving_handoff=handoff)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile.to_json()))
    loaded = load_profile(path, "tiny", warn=lambda m: None)
    assert loaded.serving_handoff == handoff
    assert loaded.handoff_overhead_s == pytest.approx(0.04)  # beyond a local request's 10 ms
    assert loaded.pool_step_model(Role.DECODE) == ServedStepModel(OLD, 0.004)
    local_model = ServedStepModel(OLD, 0.001)
    assert loaded.pool_step_model(Role.PREFILL) == loaded.pool_step_model(Role.MIXED) == local_model


def test_a_hand_off_waits_the_hand_off_overhead_before_its_first_token() -> None:
    pools = (PoolSpec(Role.PREFILL, 1, OLD, 256, link=LinkModel(1e9, 1e-4)),
             PoolSpec(Role.DECODE, 1, OLD, 256))

    def ttft(extra_s: float) -> float:
        config = SimConfig(pools=pools, enable_prefix_caching=False, max_model_len=2048,
                           disagg_policy="always", num_layers=2, kv_bytes_per_token=64,
                           handoff_overhead_s=extra_s)
        rec = Simulator(config).run([SimRequest(0.0, tuple(range(3, 103)), 4)]).records[0]
        assert rec.ttft_s is not None
        return rec.ttft_s

    assert ttft(0.03) - ttft(0.0) == pytest.approx(0.03)


def test_loaded_overhead_is_what_requests_sent_under_load_wait_beyond_the_simulation() -> None:
    """Served requests at their send times: 'measured' = simulated with 30 ms more per request; the
    loaded figure recovers it (and not 0, and not the idle figure), clamped at 0 when served faster."""
    sched = SchedulerConfig(chunk_size=256)
    pools = (PoolSpec(Role.MIXED, 1, OLD, 256),)
    sent = [RequestRecord(index=i, sent_s=0.15 * i, num_prompt_tokens=40 + 30 * i, num_output_tokens=8)
            for i in range(6)]  # arrivals while earlier requests still decode
    simulated = simulate_alone(sent, pools, sched, 16, 2048, 256, at_sent=True)
    assert [r.sent_s for r in simulated] == pytest.approx([r.sent_s for r in sent])
    served = simulate_alone(sent, pools, sched, 16, 2048, 256, at_sent=True, request_overhead_s=0.03)
    extra, used = derive_loaded(served, simulated)
    assert extra == pytest.approx(0.03, abs=2e-3) and used >= MIN_UNQUEUED
    assert derive_loaded(simulated, served)[0] == 0.0
    with pytest.raises(ValueError, match="no loaded request"):
        derive_loaded([RequestRecord(index=0)], [RequestRecord(index=0)])


def test_the_loaded_figure_is_the_simulated_request_overhead(tmp_path: Path) -> None:
    """`simulate --profile` waits the loaded figure before each first token (an old profile: the idle one)."""
    from pdserve.cli import main

    def ttft_ms(serving: ServingOverhead) -> float:
        profile = Profile(model="tiny", arch={}, machine=machine_identity(1), engine={}, step_model=OLD,
                          fit={}, links={"shm": LinkModel(5e9, 1e-4)}, samples=[], serving=serving)
        path, out = tmp_path / "p.json", tmp_path / "o.json"
        path.write_text(json.dumps(profile.to_json()))
        assert main(["simulate", "--model", "tiny", "--profile", str(path), "--workload", "synthetic",
                     "--input-len", "40", "--output-len", "3", "--num-requests", "1",
                     "--threads-per-worker", "1", "--output", str(out)]) == 0
        return float(json.loads(out.read_text())["runs"][0]["requests"][0]["ttft_ms"])

    idle = ttft_ms(ServingOverhead(0.01, 0.0))
    assert ttft_ms(ServingOverhead(0.01, 0.0, first_token_loaded_s=0.05,
                                   loaded_estimator=LOADED_ESTIMATOR)) - idle == pytest.approx(40, abs=0.5)
    # the queue-biased figure of older profiles is not waited
    assert ttft_ms(ServingOverhead(0.01, 0.0, first_token_loaded_s=0.05)) == pytest.approx(idle, abs=0.01)


def test_measure_serving_derives_the_loaded_figure_from_the_loaded_phase(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole derivation with the served deployment stood in for (``serve`` returns what a worker
    with no idle overhead but 20 ms more per request under load would have served)."""
    from pdserve.sim import serving, serving_probe

    sched = SchedulerConfig(chunk_size=256)
    w = serving_probe.ServedModel("tiny", [], 1, OLD, sched, 16, 256, 2048, 256)
    pools = (PoolSpec(Role.MIXED, 1, OLD, 256),)
    one_at_a_time = [RequestRecord(index=i, num_prompt_tokens=n, num_output_tokens=serving.OUTPUT_TOKENS)
                     for i, n in enumerate((48, 160, 400))]
    batch = [RequestRecord(index=i, num_prompt_tokens=160, num_output_tokens=serving.OUTPUT_TOKENS)
             for i in range(serving.BATCH)]
    loaded = [RequestRecord(index=i, sent_s=0.2 * i, num_prompt_tokens=48 + 30 * i,
                            num_output_tokens=serving.OUTPUT_TOKENS) for i in range(serving.LOADED_REQUESTS)]

    def fake_serve(model: serving_probe.ServedModel, disaggregated: bool,
                   step_log_dir: Path | None = None) -> tuple[list[RequestRecord], ...]:
        assert model is w and not disaggregated and step_log_dir is not None
        # the mixed worker's step log: 1.5 ms between steps after one sampled row, 2.5 ms after four
        steps = [(0.0, 0.01, decode(1)), (0.0115, 0.01, decode(4)), (0.024, 0.01, decode(1)),
                 (0.0355, 0.01, decode(1))]
        (step_log_dir / "mixed-0.jsonl").write_text("".join(
            json.dumps({"t": t, "s": d, "shape": dataclasses.asdict(shape)}) + "\n" for t, d, shape in steps))
        return (simulate_alone(one_at_a_time, pools, sched, 16, 2048, 256),
                simulate_alone(batch, pools, sched, 16, 2048, 256, together=True),
                simulate_alone(loaded, pools, sched, 16, 2048, 256, at_sent=True, request_overhead_s=0.02))

    monkeypatch.setattr(serving_probe, "serve", fake_serve)
    mixed, handoff, co_located = serving_probe.measure_serving(w)
    assert handoff is None and co_located is None  # no hand-off probe: no served pair
    # per token: the worker loop's gap in its step log, not the streams' pace (0 here: served = simulated)
    assert mixed.per_token_s == pytest.approx(0.0015) and mixed.per_token_method == PER_TOKEN_METHOD
    assert mixed.probe_per_token_s == pytest.approx(0.0, abs=1e-6)
    assert mixed.first_token_s == 0.0  # the TTFT gap (0) less the gap, clamped
    assert mixed.first_token_loaded_s == pytest.approx(0.02, abs=2e-3)
    assert mixed.loaded_usable and mixed.per_request_s == mixed.first_token_loaded_s
    assert mixed.num_requests == 3 + serving.BATCH + serving.LOADED_REQUESTS and "Poisson" in mixed.method


def test_the_loaded_figure_is_not_the_queue_the_probe_built() -> None:
    """Served steps 20% slower than the model, requests in bursts: a request queued behind others pays
    their shortfall too, so the median gap over every request grows with the queue (the estimator
    before); the figure counts only the requests that waited behind none, in both runs."""
    sched = SchedulerConfig(chunk_size=256, max_num_batched_tokens=256)  # one prompt after another
    slow = LinearStepModel(tuple(1.2 * c for c in OLD.coefficients))
    sent = [RequestRecord(index=i, sent_s=2.0 * (i // 4) + 0.001 * (i % 4), num_prompt_tokens=300,
                          num_output_tokens=8) for i in range(12)]  # 3 bursts of 4
    simulated = simulate_alone(sent, (PoolSpec(Role.MIXED, 1, OLD, 256),), sched, 16, 2048, 256, at_sent=True)
    served = simulate_alone(sent, (PoolSpec(Role.MIXED, 1, slow, 256),), sched, 16, 2048, 256, at_sent=True)
    gaps = sorted(m.ttft_s - s.ttft_s for m, s in zip(served, simulated, strict=True)
                  if m.ttft_s is not None and s.ttft_s is not None)
    one_prompt = gaps[0]  # the first of a burst: its own step's 20% only
    assert statistics.median(gaps) > 1.5 * one_prompt  # the old estimator: the queue's
    extra, used = derive_loaded(served, simulated)
    assert used == 3  # the first request of each burst
    assert extra == pytest.approx(one_prompt, rel=1e-6)
    # fewer than MIN_UNQUEUED requests that waited behind none: no loaded figure beyond the idle one
    assert derive_loaded(served[:4], simulated[:4]) == (0.0, 1)


def prompt(n: int) -> StepShape:
    return StepShape(n, n, 0, n * (n + 1) / 2, 0, 0, 1)


def test_the_first_token_figure_is_corrected_by_the_served_prompt_steps(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe process whose prompt steps ran 30 % over the model, with a true 5 ms before each first
    token: the figure is 5 ms, not 5 ms + the process's slowness (kept as ``probe_first_token_s``)."""
    from pdserve.sim import serving, serving_probe
    from pdserve.sim.serving import FIRST_TOKEN_METHOD, less_excess, prompt_step_excess
    from pdserve.worker.step_log import LoggedStep

    sched = SchedulerConfig(chunk_size=4096)
    w = serving_probe.ServedModel("tiny", [], 1, OLD, sched, 16, 256, 2048, 256)
    pools = (PoolSpec(Role.MIXED, 1, OLD, 256),)
    lengths = (48, 160, 400)
    asked = [RequestRecord(index=i, num_prompt_tokens=n, num_output_tokens=serving.OUTPUT_TOKENS)
             for i, n in enumerate(lengths)]
    base = simulate_alone(asked, pools, sched, 16, 2048, 256)
    sent = [100.0 + 10 * i for i in range(len(lengths))]  # on the host's clock, as the probe records them
    slow = [0.3 * OLD.step_time_s(prompt(n)) for n in lengths]
    served = [replace(r, sent_s=t, ttft_s=r.ttft_s + x + 0.005, e2e_s=r.e2e_s + x + 0.005)
              for r, t, x in zip(base, sent, slow, strict=True)]
    log = [LoggedStep(t + 0.002, 1.3 * OLD.step_time_s(prompt(n)), prompt(n))
           for t, n in zip(sent, lengths, strict=True)]
    log.append(LoggedStep(500.0, 1.0, prompt(400)))  # outside every request's window
    assert prompt_step_excess(served, log, OLD) == pytest.approx(slow)
    assert [r.ttft_s for r in less_excess(served, slow)] == pytest.approx([r.ttft_s + 0.005 for r in base])

    def fake_serve(model: serving_probe.ServedModel, disaggregated: bool,
                   step_log_dir: Path | None = None) -> tuple[list[RequestRecord], ...]:
        assert step_log_dir is not None
        (step_log_dir / "mixed-0.jsonl").write_text("".join(
            json.dumps({"t": s.t, "s": s.s, "shape": dataclasses.asdict(s.shape)}) + "\n" for s in log))
        return served, [], []

    monkeypatch.setattr(serving_probe, "serve", fake_serve)
    mixed = serving_probe.measure_serving(w).serving
    assert mixed.first_token_method == FIRST_TOKEN_METHOD
    assert mixed.first_token_s == pytest.approx(0.005, abs=1e-6)
    assert mixed.probe_first_token_s == pytest.approx(0.005 + statistics.median(slow), abs=1e-6)
    back = ServingOverhead.from_json(json.loads(json.dumps(mixed.to_json())))
    assert back.first_token_method == FIRST_TOKEN_METHOD
    assert back.probe_first_token_s == mixed.probe_first_token_s
