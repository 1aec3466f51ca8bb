"""pdserve simulate / plan / profile pieces: determinism, bench format, bad input, the planner's choice."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from pdserve.bench.metrics import SLO, RequestRecord
from pdserve.bench.workload import WorkloadConfig, make_workload
from pdserve.cli import main
from pdserve.config import SchedulerConfig
from pdserve.errors import ConfigError
from pdserve.router.cost_model import REASONS
from pdserve.sim.colocation import CoLocation
from pdserve.sim.deploy import PlannedRequest
from pdserve.sim.hardware import accelerator, paper_model
from pdserve.sim.link import Link, LinkModel
from pdserve.sim.plan import Kind, Planner, Shape, Verdict, search
from pdserve.sim.profile import Profile, load_profile, machine_identity
from pdserve.sim.roofline import RooflineStepModel
from pdserve.sim.serving import FIRST_TOKEN_METHOD, LOADED_ESTIMATOR, PER_TOKEN_METHOD, ServingOverhead
from pdserve.sim.simulator import SimRequest
from pdserve.sim.step_model import FEATURES, LinearStepModel, StepShape, fit_linear

SIM = ["simulate", "--model", "llama-3-8b", "--hardware", "h100", "--workload", "chat",
       "--request-rate", "8", "--num-requests", "60", "--no-progress"]


def run_json(tmp_path: Path, *extra: str, name: str = "out.json") -> dict:
    out = tmp_path / name
    assert main([*SIM, *extra, "--output", str(out)]) == 0
    return json.loads(out.read_text())


def test_simulate_writes_the_bench_format_deterministically(tmp_path: Path) -> None:
    a = run_json(tmp_path, "--seed", "3", name="a.json")
    b = run_json(tmp_path, "--seed", "3", name="b.json")
    c = run_json(tmp_path, "--seed", "4", name="c.json")
    reqs = a["runs"][0]["requests"]
    for run in (*a["runs"], *b["runs"]):
        del run["wall_s"]  # the simulator's own time, not simulated time
    assert a["runs"] == b["runs"]
    assert a["runs"][0]["requests"] != c["runs"][0]["requests"]
    # the bench's per-request fields, and its summary
    assert set(reqs[0]) == set(RequestRecord(index=0).to_json())
    assert a["runs"][0]["summary"]["num_ok"] == 60
    # the same seeded requests pdserve bench sends: same output lengths, in order
    specs = make_workload(WorkloadConfig(kind="chat", seed=3))
    assert [r["max_tokens"] for r in reqs] == [next(specs).max_tokens for _ in reqs]
    assert all(r["num_output_tokens"] == r["max_tokens"] for r in reqs)


def test_simulate_disaggregated_heterogeneous_and_sweep(tmp_path: Path) -> None:
    out = run_json(tmp_path, "--prefill", "1", "--decode", "2", "--decode-hardware", "a100",
                   "--sweep", "2,8", "--slo", "ttft_ms=2000,tpot_ms=100")
    assert [r["rate"] for r in out["runs"]] == [2.0, 8.0]
    assert out["sweep"]["max_rate"] == 8.0
    labels = [p["label"] for p in out["config"]["pools"]]
    assert labels == ["h100×1", "a100×1"]


def test_simulate_takes_the_router_options_and_reports_decisions(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = run_json(tmp_path, "--prefill", "1", "--decode", "1", "--mixed", "1", name="pdm.json")
    assert [p["role"] for p in out["config"]["pools"]] == ["prefill", "decode", "mixed"]
    routing = out["routing"][0]
    assert routing["policy"] == "kv_aware" and routing["disagg_policy"] == "auto"  # pdserve serve's defaults
    assert sum(routing["decisions"].values()) == 60 == routing["num_local"] + routing["num_remote"]
    assert sum(routing["computed_by"].values()) == 60  # prompts computed, per worker
    assert "routing (kv_aware, disagg auto): " in capsys.readouterr().out
    out = run_json(tmp_path, "--policy", "round_robin", "--disagg-policy", "always", name="always.json")
    routing = out["routing"][0]
    assert routing["decisions"] == {"forced_remote": 60} and routing["kv_bytes"] > 0
    assert [p["role"] for p in out["config"]["pools"]] == ["prefill", "decode"]  # no mixed unless asked


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--hardware", "h900"], "known: a100, h100, h200, l40s, mi300x, trn1"),
        (["--model", "gpt-5"], "known: llama-3-70b, llama-3-8b"),
        (["--model", "llama-3-70b"], "do not fit"),
        (["--tp", "16"], "modelled for 1..8"),
        (["--hardware", "trn1", "--tp", "2"], "modelled for 1..1"),
        (["--precision", "fp8", "--hardware", "a100"], "no fp8"),
        (["--mode", "aggregated", "--mixed", "0"], "needs ≥ 1 worker"),
    ],
)
def test_simulate_bad_input_is_a_clear_error(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
                                             ) -> None:
    assert main([*SIM, *argv]) == 2
    assert message in capsys.readouterr().err


def make_profile(model: str = "tiny") -> Profile:
    return Profile(model=model, arch={}, machine=machine_identity(1), engine={},
                   step_model=LinearStepModel((0.01, 1e-4, 0.0, 1e-6, 1e-4)),
                   fit={}, links={"shm": LinkModel(5e9, 1e-4)}, samples=[],
                   serving=ServingOverhead(0.0, 0.0, num_requests=1, method="test", first_token_loaded_s=0.0,
                                           loaded_estimator=LOADED_ESTIMATOR),
                   co_located=CoLocation())


def test_profile_of_another_model_is_refused_and_another_machine_warned(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(make_profile("tiny").to_json()))
    with pytest.raises(ConfigError, match="taken with model 'tiny', not 'bench-50m'"):
        load_profile(path, "bench-50m")
    warnings: list[str] = []
    other = make_profile("tiny")
    other.machine["cpu"] = "some other CPU"
    path.write_text(json.dumps(other.to_json()))
    loaded = load_profile(path, "tiny", warn=warnings.append)
    assert loaded.step_model == other.step_model and loaded.links == other.links
    assert len(warnings) == 1 and "cpu" in warnings[0]
    path.write_text("{}")
    with pytest.raises(ConfigError, match="not a pdserve profile"):
        load_profile(path, "tiny")


def test_simulate_with_a_profile(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(make_profile("tiny").to_json()))
    out = tmp_path / "o.json"
    argv = ["simulate", "--model", "tiny", "--profile", str(path), "--workload", "synthetic",
            "--input-len", "40", "--output-len", "5", "--num-requests", "5", "--request-rate", "1",
            "--threads-per-worker", "1", "--output", str(out)]
    assert main(argv) == 0
    reqs = json.loads(out.read_text())["runs"][0]["requests"]
    # --model implies the model's tokenizer: 40 of its tokens (+ BOS), not 40 words (many more tokens)
    assert all(r["num_prompt_tokens"] in (40, 41) for r in reqs)
    # profile: 10 ms + 0.1 ms/token + 0.1 ms/sample per step; a decode step of one request ≈ 10.2 ms
    assert reqs[0]["tpot_ms"] == pytest.approx(10.2, rel=0.05)


def test_simulate_counts_prompt_lengths_in_the_models_own_tokens(tmp_path: Path) -> None:
    """--input-len is in the model's tokens when it has a tokenizer here (as --tokenizer MODEL would);
    without one (a model on paper) a word is a token."""
    path = tmp_path / "p.json"
    path.write_text(json.dumps(make_profile("tiny").to_json()))
    base = ["simulate", "--profile", str(path), "--workload", "synthetic", "--input-len", "300",
            "--output-len", "2", "--num-requests", "3", "--request-rate", "1", "--threads-per-worker", "1"]
    prompts = {}
    for name, extra in (("implied", []), ("explicit", ["--tokenizer", "tiny"])):
        out = tmp_path / f"{name}.json"
        assert main([*base, "--model", "tiny", *extra, "--output", str(out)]) == 0
        prompts[name] = [r["num_prompt_tokens"] for r in json.loads(out.read_text())["runs"][0]["requests"]]
    assert prompts["implied"] == prompts["explicit"]
    assert all(300 <= n <= 301 for n in prompts["implied"])  # + BOS
    out = tmp_path / "paper.json"
    assert main(["simulate", "--model", "llama-3-8b", "--hardware", "h100", "--workload", "synthetic",
                 "--input-len", "300", "--output-len", "2", "--num-requests", "3", "--request-rate", "1",
                 "--output", str(out)]) == 0
    assert all(r["num_prompt_tokens"] == 300 for r in json.loads(out.read_text())["runs"][0]["requests"])


def test_fit_recovers_a_known_linear_model() -> None:
    true = LinearStepModel((0.005, 2e-4, 1e-7, 3e-6, 1e-3))
    shapes = [StepShape(t, t - d, d, (t - d) * (t - d) / 2, d * c, 0, d + 1)
              for t, d, c in [(1, 1, 100), (8, 8, 500), (32, 32, 50), (128, 0, 0), (512, 0, 0),
                              (300, 44, 200), (2048, 0, 0), (64, 64, 1000), (16, 4, 20)]]
    fit = fit_linear(shapes, [true.step_time_s(s) for s in shapes])
    assert fit.median_abs_rel_error < 1e-6
    for got, want in zip(fit.model.coefficients, true.coefficients, strict=True):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-12)
    with pytest.raises(ValueError, match=f"at least {len(FEATURES)}"):
        fit_linear(shapes[:2], [0.1, 0.2])


def test_layered_push_overlaps_compute_and_link() -> None:
    link = Link(LinkModel(1e9))  # 1 GB/s
    # compute-bound: 8 layers of 1 MB over a 100 ms step: only the last layer's copy (1 ms) is exposed
    assert link.push_layered(0.0, 0.1, 8, 8_000_000) == pytest.approx(0.101)
    # link-bound: 80 MB after a 10 ms step: first layer ready at 1.25 ms, then 80 ms of copy
    link = Link(LinkModel(1e9))
    assert link.push_layered(0.0, 0.01, 8, 80_000_000) == pytest.approx(0.08125)
    # a backlog queues behind it
    assert link.push(0.0, 1_000_000) == pytest.approx(0.08225)


def test_roofline_decode_is_memory_bound_and_prefill_compute_bound() -> None:
    m = RooflineStepModel(paper_model("llama-3-8b"), accelerator("h100"))
    decode = m.step_time_s(StepShape(1, 0, 1, 0.0, 100, 0, 1))
    # ~16 GB of bf16 weights at 80% of 3.35 TB/s ≈ 6 ms, + 1.5 ms overhead
    assert 6e-3 < decode < 9e-3
    prefill = m.step_time_s(StepShape(4096, 4096, 0, 4096 * 4096 / 2, 0, 0, 1))
    # 2 × 7B × 4096 tokens ≈ 60 TFLOP at 60% of 989 TFLOP/s ≈ 0.1 s
    assert 0.08 < prefill < 0.2
    assert m.num_kv_blocks(16) > 1000
    assert RooflineStepModel(paper_model("llama-3-8b"), accelerator("h100"), tp=2).step_time_s(
        StepShape(1, 0, 1, 0.0, 100, 0, 1)) < decode


# -- the planner --------------------------------------------------------------------------------


def planner_case(slo: SLO) -> tuple[Planner, Kind, Kind]:
    arch = paper_model("llama-3-8b")
    h100 = accelerator("h100")
    # a part 1/5 as fast at 1/10 of the price: two of them beat one fast one on cost
    slow = replace(h100, key="slow", bf16_flops=h100.bf16_flops / 5, mem_bytes_per_s=h100.mem_bytes_per_s / 5,
                   price_per_hour=h100.price_per_hour / 10)
    # 2,000-token prompts (distinct: no prefix-cache hits) at 4 req/s
    requests = [PlannedRequest(SimRequest(i / 4, tuple(3 + (i * 7919 + k) % 30000 for k in range(2000)), 20),
                               False) for i in range(60)]
    planner = Planner(arch, requests, 4.0, slo, SchedulerConfig(), max_workers=4)
    return planner, Kind(h100, 1), Kind(slow, 1)


def test_plan_picks_the_cheaper_shape() -> None:
    planner, fast, slow = planner_case(SLO(ttft_ms=350, tpot_ms=60))
    one_slow = planner.evaluate(Shape(mixed=(slow, 1)))
    assert not one_slow.meets(0.9)  # so the answer is not trivially the cheapest part alone
    result = search(planner, [fast, slow], [fast, slow], [fast, slow], modes=("aggregated",))
    assert result.best is not None and result.best.shape.mixed is not None
    kind, count = result.best.shape.mixed
    assert kind is slow and count == 2
    assert result.best.cost_per_hour < fast.price_per_hour
    assert planner.evaluate(Shape(mixed=(fast, 1))).meets(0.9)
    # shapes are judged with the router's placement: every request's decision is counted
    disagg = planner.evaluate(Shape(prefill=(fast, 1), decode=(slow, 1)))
    assert sum(disagg.decisions.values()) == 60 and set(disagg.decisions) <= set(REASONS)
    assert planner.evaluate(Shape(mixed=(fast, 1))).decisions == {"aggregated": 60}


def test_plan_finds_the_cheaper_pair_when_more_prefill_needs_fewer_decode() -> None:
    """Sizing P first, then D, is not enough: a full decode pool holds prompts back (the prefill gate)."""
    planner, fast, _ = planner_case(SLO(ttft_ms=350, tpot_ms=60))
    planner.max_workers = 16

    def evaluate(shape: Shape) -> Verdict:  # 1 P needs 4 D's room for its prompts; 2 P need 1 D
        assert shape.prefill is not None and shape.decode is not None
        p, d = shape.prefill[1], shape.decode[1]
        ttft = 1.0 if (p >= 1 and d >= 4) or p >= 2 else 0.5
        return Verdict(shape, ttft, ttft, 1.0, 0.0, 0.0, shape.price_per_hour, 0.0)

    planner.evaluate = evaluate  # type: ignore[method-assign]
    v = planner.best_disaggregated(fast, fast)
    assert v is not None and (v.shape.prefill[1], v.shape.decode[1]) == (2, 1)  # type: ignore[index]
    # fewest P first (1), then fewest D for it (4), was the old answer: 5 workers for 3


def test_plan_says_when_no_shape_meets_the_slo() -> None:
    planner, fast, slow = planner_case(SLO(ttft_ms=0.1))  # 0.1 ms TTFT: impossible
    result = search(planner, [fast, slow], [fast], [slow])
    assert result.best is None and result.closest is not None
    assert main(["plan", "--model", "llama-3-8b", "--request-rate", "2", "--slo", "ttft_ms=0.1",
                 "--hardware", "h100", "--tp", "1", "--num-requests", "20", "--max-workers", "2"]) == 1


def test_plan_cli_answers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "llama-3-8b", "--workload", "chat", "--request-rate", "4",
                 "--slo", "ttft_ms=500,tpot_ms=50", "--hardware", "h100,l40s", "--tp", "1",
                 "--num-requests", "40", "--max-workers", "4"]) == 0
    out = capsys.readouterr().out
    assert "cheapest:" in out and "/M out" in out
    assert main(["plan", "--model", "llama-3-8b", "--request-rate", "4", "--slo", "ttft_ms=500",
                 "--hardware", "h999"]) == 2


@pytest.mark.slow
def test_profile_measures_this_machine_and_simulate_uses_it(tmp_path: Path) -> None:
    path = tmp_path / "tiny.json"
    assert main(["profile", "--model", "tiny", "--quick", "--threads", "1", "--transports", "shm",
                 "--output", str(path)]) == 0
    data = json.loads(path.read_text())
    coefficients = data["step_model"]["coefficients_s"]
    assert set(coefficients) == set(FEATURES) and all(v >= 0 for v in coefficients.values())
    assert any(v > 0 for v in coefficients.values())  # (no timed assertion: the machine is shared)
    assert data["step_model"]["num_samples"] >= len(FEATURES)
    assert data["links"]["shm"]["bandwidth_bytes_per_s"] > 0
    assert data["machine"]["threads"] == 1 and data["model"] == "tiny"
    serving = data["serving_overhead"]  # served through a real router + worker
    assert serving["num_requests"] >= 1 and serving["first_token_s"] >= 0 and serving["per_row_s"] >= 0
    # per token: the served worker's own step log (its loop between busy steps), read back
    assert serving["per_token_method"] == PER_TOKEN_METHOD and 0 < serving["per_token_s"] < 0.05
    assert "step log" in serving["method"] and "probe_per_token_s" in serving
    assert data["serving_overhead_handoff"]["per_token_method"] == PER_TOKEN_METHOD
    # before the first token: the TTFTs corrected by the served prompt steps' own times (the step log)
    assert serving["first_token_method"] == FIRST_TOKEN_METHOD and serving["probe_first_token_s"] >= 0
    assert data["serving_overhead_handoff"]["first_token_method"] == FIRST_TOKEN_METHOD
    assert serving["first_token_loaded_s"] >= 0  # and under a Poisson load
    assert serving["first_token_loaded_estimator"] == LOADED_ESTIMATOR
    assert data["serving_overhead_handoff"]["first_token_loaded_s"] >= 0
    co = data["co_located"]  # steps timed beside another engine in another process
    assert co["prefill"] > 0 and co["decode"] > 0 and co["other_threads"] == 1
    assert co["num_samples"]["prefill"] > 0 and co["num_samples"]["decode"] > 0
    assert co["decode_beside_decode"] > 0 and co["num_samples"]["decode_beside_decode"] > 0  # B decoding only
    # every timing of a shape is kept (the first: the first time the engine met it), the median used
    assert all(s["time_s"] in s["rounds_s"] or len(s["rounds_s"]) % 2 == 0 for s in data["samples"])
    assert max(len(s["rounds_s"]) for s in data["samples"]) >= 3
    out = tmp_path / "sim.json"
    assert main(["simulate", "--model", "tiny", "--profile", str(path), "--num-requests", "4",
                 "--input-len", "30", "--output-len", "4", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["runs"][0]["summary"]["num_ok"] == 4


def test_plan_reads_a_recorded_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = run_json(tmp_path, "--seed", "1", name="trace.json")  # a bench-format result file
    assert main(["plan", "--model", "llama-3-8b", "--trace", str(tmp_path / "trace.json"),
                 "--request-rate", "4", "--slo", "ttft_ms=1000,tpot_ms=100", "--hardware", "h100",
                 "--tp", "1",
                 "--num-requests", "30", "--max-workers", "2", "--modes", "aggregated"]) == 0
    assert "cheapest:  agg 1 × h100×1" in capsys.readouterr().out
    assert trace["runs"][0]["requests"]
    (tmp_path / "bad.json").write_text("[]")
    assert main(["plan", "--model", "llama-3-8b", "--trace", str(tmp_path / "bad.json"),
                 "--request-rate", "4", "--slo", "ttft_ms=1000"]) == 2
