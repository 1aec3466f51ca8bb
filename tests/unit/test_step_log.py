"""``PDSERVE_STEP_LOG``: a worker's steps as JSON lines (``pdserve.worker.step_log``), and S8's step check."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pdserve.config import CacheConfig, EngineConfig, ModelConfig
from pdserve.engine.engine import LLMEngine
from pdserve.sampling_params import SamplingParams
from pdserve.sim.step_model import LinearStepModel, StepShape
from pdserve.worker.step_log import ENV, StepLog

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import s8_steps


class Inner:
    """The hooks the log wraps (a worker's prefill timer): every call must reach them."""

    def __init__(self) -> None:
        self.scheduled = 0
        self.layers = 0

    def on_schedule(self, out: object) -> None:
        self.scheduled += 1

    def on_layer_done(self, layer: int) -> None:
        self.layers += 1


def test_off_without_the_variable_and_one_record_per_step_with_it(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    inner = Inner()
    monkeypatch.delenv(ENV, raising=False)
    assert StepLog.from_env(inner, "w0") is None
    monkeypatch.setenv(ENV, str(tmp_path / "steps"))
    log = StepLog.from_env(inner, "mixed-0")
    assert log is not None
    engine = LLMEngine(EngineConfig(model=ModelConfig(model="tiny", device="cpu"),
                                    cache=CacheConfig(num_blocks=64)), detokenize=False)
    engine.add_request(list(range(3, 43)), SamplingParams(max_tokens=4, ignore_eos=True), "r0")
    steps = 0
    while engine.has_unfinished_requests():
        engine.step(hooks=log)
        log.step_done()
        steps += 1
    log.step_done()  # nothing scheduled since: no record
    log.close()
    records = [json.loads(x) for x in (tmp_path / "steps" / "mixed-0.jsonl").read_text().splitlines()]
    assert len(records) == steps == inner.scheduled == 4 and inner.layers > 0
    first, rest = records[0], records[1:]
    assert first["shape"]["num_prefill_tokens"] == 40 and first["shape"]["prefill_context"] == 0
    assert all(r["shape"]["num_decode_seqs"] == 1 and r["shape"]["num_prefill_tokens"] == 0 for r in rest)
    assert [r["shape"]["decode_context"] for r in rest] == [41, 42, 43]  # the context grows by one a step
    assert all(r["s"] > 0 for r in records) and records[0]["t"] < records[1]["t"]


def test_the_step_check_compares_served_steps_with_the_model(tmp_path: Path) -> None:
    shape = {"num_tokens": 1, "num_prefill_tokens": 0, "num_decode_seqs": 1, "prefill_pairs": 0.0,
             "decode_context": 100, "prefill_context": 0, "num_sampled": 1, "decode_padded_context": 100}
    prompt = {**shape, "num_tokens": 64, "num_prefill_tokens": 64, "num_decode_seqs": 0, "decode_context": 0,
              "decode_padded_context": 0, "prefill_pairs": 2080.0}
    lines = [{"t": 0.0, "s": 0.040, "shape": prompt}]
    lines += [{"t": 0.041 + 0.011 * i, "s": 0.010, "shape": shape} for i in range(5)]
    lines.append({"t": 5.0, "s": 0.010, "shape": shape})  # after an idle pause: not a busy gap
    (tmp_path / "mixed-0.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    model = LinearStepModel((0.008, 0.0, 0.0, 0.0, 0.0, 0.0))  # 8 ms whatever the shape
    summary = s8_steps.summarize(tmp_path, model)["mixed-0"]
    assert summary["decode"]["num_steps"] == 6 and summary["decode"]["served_over_model_p50"] == 1.25
    assert summary["prefill"]["served_over_model_p50"] == 5.0
    assert summary["busy_gap_ms_p50"] == pytest.approx(1.0, abs=0.01)
    assert "mixed-0: served/model decode 1.25×" in s8_steps.line({"mixed-0": summary})


def test_a_cells_speed_is_taken_in_its_window_and_alone_without_co_location(tmp_path: Path) -> None:
    shape = {"num_tokens": 1, "num_prefill_tokens": 0, "num_decode_seqs": 1, "prefill_pairs": 0.0,
             "decode_context": 100, "prefill_context": 0, "num_sampled": 1, "decode_padded_context": 100}
    prompt = {**shape, "num_tokens": 64, "num_prefill_tokens": 64, "num_decode_seqs": 0, "decode_context": 0,
              "decode_padded_context": 0, "prefill_pairs": 2080.0}
    # decode-0: 6 steps alone at 10 ms, then 6 beside the prefill worker's long step at 16 ms
    decode = [{"t": 0.02 * i, "s": 0.010, "shape": shape} for i in range(6)]
    decode += [{"t": 1.0 + 0.02 * i, "s": 0.016, "shape": shape} for i in range(6)]
    decode.append({"t": 9.0, "s": 0.080, "shape": shape})  # outside the window
    prefill = [{"t": 0.99, "s": 0.2, "shape": prompt}]
    (tmp_path / "decode-0.jsonl").write_text("".join(json.dumps(x) + "\n" for x in decode))
    (tmp_path / "prefill-0.jsonl").write_text("".join(json.dumps(x) + "\n" for x in prefill))
    model = LinearStepModel((0.008, 0.0, 0.0, 0.0, 0.0, 0.0))  # 8 ms whatever the shape
    every = s8_steps.window_speed(tmp_path, model, 0.0, 5.0)
    assert every["decode"] == pytest.approx((1.25 + 2.0) / 2) and every["prefill"] == pytest.approx(25.0)
    alone = s8_steps.window_speed(tmp_path, model, 0.0, 5.0, alone=True)
    assert alone["decode"] == pytest.approx(1.25)  # the co-located steps left out
    assert alone["prefill"] == pytest.approx(25.0)  # under 5 alone: every step of the kind
    assert s8_steps.window_speed(tmp_path, model, 8.0, 10.0) == {"decode": pytest.approx(10.0)}
    scaled = s8_steps.KindScaled(model, alone)
    decode_shape = StepShape(**shape)
    assert scaled.step_time_s(decode_shape) == pytest.approx(0.010)
    partners = s8_steps.by_partner(tmp_path, model)
    assert partners["decode-0"]["decode alone"] == {"num_steps": 7, "served_over_model_p50": 1.25,
                                                     "over_alone": 1.0}  # the step at 9 s too
    assert partners["decode-0"]["decode beside prefill"]["over_alone"] == pytest.approx(2.0 / 1.25)
    assert partners["prefill-0"] == {"prefill mixed": {"num_steps": 1, "served_over_model_p50": 25.0,
                                                       "over_alone": None}}  # decode steps cover 48 %
    cells = [{"config": "disagg", "rate_per_s": 0.5, "served_speed": every, "served_speed_alone": alone,
              "at_served_speed": {"ttft_ms_p50": 0.04}}]
    table = "\n".join(s8_steps.speed_table(cells, ("ttft_ms_p50",)))
    assert "| disagg | 0.5 | 1.62, 25.00 | 1.25, 25.00 | +4% |" in table
