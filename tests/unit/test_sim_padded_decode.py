"""The decode step's key term: the batched decode attention pads every row to the longest context."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from pdserve.config import Role, SchedulerConfig
from pdserve.request import Request
from pdserve.sampling_params import SamplingParams
from pdserve.sim.step_model import LinearStepModel, StepShape, fit_linear
from pdserve.sim.worker import SimWorker

MODEL = LinearStepModel((0.01, 1e-4, 0.0, 1e-5, 1e-4, 0.005))


@dataclass
class Recorder:
    """A step model that keeps the shapes it is asked about."""

    shapes: list[StepShape] = field(default_factory=list)

    def step_time_s(self, shape: StepShape) -> float:
        self.shapes.append(shape)
        return MODEL.step_time_s(shape)


def decode_shapes(prompt_lens: tuple[int, ...], max_tokens: int = 4) -> list[StepShape]:
    """The decode-only steps of the real scheduler running these prompts together."""
    recorder = Recorder()
    worker = SimWorker("w", Role.MIXED, SchedulerConfig(chunk_size=2048), 256, 16, False, 4096, recorder)
    for i, n in enumerate(prompt_lens):
        worker.scheduler.add_request(Request(f"r{i}", list(range(3, 3 + n)),
                                             SamplingParams(max_tokens=max_tokens, ignore_eos=True), ()))
    while worker.begin_step(0.0) is not None:
        worker.end_step()
    return [s for s in recorder.shapes if s.num_prefill_tokens == 0]


def test_a_decode_batch_reads_every_row_padded_to_the_longest_context() -> None:
    shapes = decode_shapes((20, 500))
    assert shapes and all(s.num_decode_seqs == 2 for s in shapes)
    first = shapes[0]  # contexts 21 and 501 (the prompt and the token sampled with it)
    assert first.decode_context == 21 + 501
    assert first.decode_padded_context == 2 * 501
    assert first.decode_keys == 2 * 501
    # the step model charges the padded keys: the short row costs as much attention as the long one
    summed = StepShape(first.num_tokens, 0, 2, 0.0, first.decode_context, 0, 2)
    assert MODEL.step_time_s(first) - MODEL.step_time_s(summed) == pytest.approx(1e-5 * (1002 - 522))


def test_a_uniform_batch_is_unchanged_and_old_shapes_use_the_sum() -> None:
    uniform = decode_shapes((100, 100, 100))[0]
    assert uniform.decode_padded_context == uniform.decode_context == 3 * 101
    old = StepShape(3, 0, 3, 0.0, 303, 0, 3)  # a shape recorded before the field: -1, the sum
    assert old.decode_padded_context == -1 and old.decode_keys == 303
    assert MODEL.step_time_s(old) == MODEL.step_time_s(uniform)


def test_the_fit_finds_the_per_key_cost_of_mixed_length_batches() -> None:
    """Steps timed as the engine takes them (padded keys): the fit on the padded feature recovers the
    model; fitted on the sums of the contexts it could not (the mixed batches look cheaper than they are)."""
    shapes = [StepShape(n, n, 0, n * (n + 1) / 2, 0, 0, 1) for n in (16, 64, 256, 1024)]
    for b in (1, 2, 4, 8, 16):
        for short, long_ in ((64, 64), (64, 1024), (512, 512), (32, 2048)):
            total = short * (b - 1) + long_
            shapes.append(StepShape(b, 0, b, 0.0, total, 0, b, b * long_))
    times = [MODEL.step_time_s(s) for s in shapes]
    fit = fit_linear(shapes, times)
    assert fit.p90_abs_rel_error < 1e-6
    assert fit.model.coefficients[3] == pytest.approx(1e-5, rel=1e-6)
    unpadded = [StepShape(*(getattr(s, f) for f in (
        "num_tokens", "num_prefill_tokens", "num_decode_seqs", "prefill_pairs", "decode_context",
        "prefill_context", "num_sampled"))) for s in shapes]
    assert fit_linear(unpadded, times).p90_abs_rel_error > 0.05
