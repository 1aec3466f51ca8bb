"""How long one engine step takes: the simulator's replacement for the model runner.

1. :func:`step_shape` reduces a real :class:`SchedulerOutput` to the few
   numbers a step's time depends on (:class:`StepShape`).
2. A :class:`StepModel` turns a shape into seconds. Two kinds:

   - :class:`LinearStepModel`, fitted by ``pdserve profile`` on this machine:
     ``t = a + b·tokens + c·prefill_pairs + d·decode_context + e·sampled + f·multi_row``
     (``tokens``: all tokens computed in the step; ``prefill_pairs``: query ×
     key pairs of the prompt chunks, the quadratic part of attention;
     ``decode_context``: keys read by the decoding requests — the batched
     decode attention pads every row to the batch's longest context, so this
     is rows × the longest context (:attr:`StepShape.decode_padded_context`),
     not the sum of the contexts; ``sampled``: rows
     that go through the LM head and the sampler; ``multi_row``: 1 when the
     step computes more than one token — a matrix-matrix instead of a
     matrix-vector product, a step cost on CPUs that a single decode does not pay).
   - :class:`RooflineStepModel` (in :mod:`pdserve.sim.roofline`), from an
     accelerator's datasheet and a model's shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pdserve.engine.scheduler import SchedulerOutput

#: Names of the linear model's coefficients, in order (the first multiplies 1).
FEATURES = ("const", "tokens", "prefill_pairs", "decode_context", "sampled", "multi_row")

#: Coefficients added after the first profiles: a profile without one loads with it at 0 (its old form).
LATER_FEATURES = ("multi_row",)


@dataclass(frozen=True)
class StepShape:
    """What a step computes, in the units a step time depends on.

    Attributes:
        num_tokens: tokens computed (prompt chunks + one per decoding request).
        num_prefill_tokens: the prompt-chunk part of ``num_tokens``.
        num_decode_seqs: requests computing one generated token.
        prefill_pairs: Σ over prompt chunks of new × (cached + (new + 1) / 2): query-key pairs.
        decode_context: Σ over decoding requests of the keys they attend to.
        prefill_context: Σ over prompt chunks of the keys already cached before the chunk.
        num_sampled: requests that sample a token this step.
        decode_padded_context: keys the decode attention reads: decoding requests × the longest
            context among them (``pdserve.model.attention`` gathers every row's context padded to the
            longest and masks the tail, so one long request makes every row of the batch read that
            many keys); -1 when unknown (shapes recorded before it was: then ``decode_context``,
            exact for the profile's uniform decode batches).
    """

    num_tokens: int
    num_prefill_tokens: int
    num_decode_seqs: int
    prefill_pairs: float
    decode_context: int
    prefill_context: int
    num_sampled: int
    decode_padded_context: int = -1

    @property
    def decode_keys(self) -> int:
        """Keys the decode attention reads (the padded context when known, else the sum)."""
        return self.decode_context if self.decode_padded_context < 0 else self.decode_padded_context

    def features(self) -> list[float]:
        """The linear model's regressors, in :data:`FEATURES` order (``decode_context``: the keys the
        decode attention reads, :attr:`decode_keys`)."""
        return [1.0, float(self.num_tokens), self.prefill_pairs, float(self.decode_keys),
                float(self.num_sampled), 1.0 if self.num_tokens > 1 else 0.0]


def step_shape(out: SchedulerOutput) -> StepShape:
    """The shape of one scheduled step (before ``Scheduler.update`` advances the requests)."""
    num_tokens = num_prefill = num_decode = decode_ctx = prefill_ctx = num_sampled = longest = 0
    pairs = 0.0
    for item in out.scheduled:
        new, done = item.num_new_tokens, item.request.num_computed_tokens
        num_tokens += new
        is_decode = new == 1 and item.request.num_output_tokens > 0 and done == item.request.num_tokens - 1
        if is_decode:
            num_decode += 1
            decode_ctx += done + 1
            longest = max(longest, done + 1)
        else:
            num_prefill += new
            prefill_ctx += done
            pairs += new * (done + (new + 1) / 2)
        if done + new == item.request.num_tokens:
            num_sampled += 1
    return StepShape(num_tokens, num_prefill, num_decode, pairs, decode_ctx, prefill_ctx, num_sampled,
                     num_decode * longest)


class ShapeHooks:
    """StepHooks that keep the shape of the step about to run (:func:`step_shape`)."""

    def __init__(self) -> None:
        self.shape: StepShape | None = None

    def on_schedule(self, out: SchedulerOutput) -> None:
        self.shape = step_shape(out)

    def on_layer_done(self, layer: int) -> None:
        pass


class StepModel(Protocol):
    """Seconds one step of a given shape takes on one worker."""

    def step_time_s(self, shape: StepShape) -> float:
        """Predicted wall time of the step."""


@dataclass(frozen=True)
class LinearStepModel:
    """``t = Σ coef_i · feature_i`` over :data:`FEATURES` (seconds).

    Coefficients of the first form (without :data:`LATER_FEATURES`) are accepted: those are 0.
    """

    coefficients: tuple[float, ...]

    def __post_init__(self) -> None:
        n, old = len(self.coefficients), len(FEATURES) - len(LATER_FEATURES)
        if n == old:
            object.__setattr__(self, "coefficients", (*self.coefficients, *([0.0] * len(LATER_FEATURES))))
        elif n != len(FEATURES):
            raise ValueError(f"a linear step model has {len(FEATURES)} coefficients ({', '.join(FEATURES)})")

    def step_time_s(self, shape: StepShape) -> float:
        """Predicted wall time of the step."""
        c = self.coefficients
        return (c[0] + c[1] * shape.num_tokens + c[2] * shape.prefill_pairs + c[3] * shape.decode_keys
                + c[4] * shape.num_sampled + (c[5] if shape.num_tokens > 1 else 0.0))

    def to_json(self) -> dict[str, Any]:
        """The coefficients by name (seconds per unit)."""
        return dict(zip(FEATURES, self.coefficients, strict=True))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LinearStepModel:
        """Inverse of :meth:`to_json`; names the missing coefficient (one of :data:`LATER_FEATURES`
        missing is 0: see :func:`missing_later_features`)."""
        data = {**{f: 0.0 for f in LATER_FEATURES}, **data}
        missing = [f for f in FEATURES if f not in data]
        if missing:
            raise ValueError(f"step model misses coefficient(s) {', '.join(missing)}")
        return cls(tuple(float(data[f]) for f in FEATURES))


def missing_later_features(data: dict[str, Any]) -> list[str]:
    """The coefficients of :data:`LATER_FEATURES` a profile's ``coefficients_s`` lacks (an older profile)."""
    return [f for f in LATER_FEATURES if f not in data]


@dataclass(frozen=True)
class FitResult:
    """A fitted model and how well it explains the samples it was fitted on."""

    model: LinearStepModel
    num_samples: int
    median_abs_rel_error: float
    p90_abs_rel_error: float


def fit_linear(shapes: list[StepShape], times_s: list[float]) -> FitResult:
    """Least squares on relative error, coefficients kept ≥ 0 (a negative cost per token is noise).

    Each sample is weighted by 1 / its time, so a 2 ms decode step counts as much
    as a 500 ms prefill; coefficients that come out negative are dropped and the
    rest refitted.
    """
    if len(shapes) != len(times_s) or len(shapes) < len(FEATURES):
        raise ValueError(f"need at least {len(FEATURES)} timed steps to fit, got {len(shapes)}")
    x = np.array([s.features() for s in shapes], dtype=np.float64)
    y = np.array(times_s, dtype=np.float64)
    w = 1.0 / np.maximum(y, 1e-9)
    active = list(range(len(FEATURES)))
    coef = np.zeros(len(FEATURES))
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active] * w[:, None], y * w, rcond=None)
        coef[:] = 0.0
        coef[active] = sol
        negative = [i for i, v in zip(active, sol, strict=True) if v < 0]
        if not negative:
            break
        worst = min(negative, key=lambda i: coef[i])
        active.remove(worst)
    rel = np.abs(x @ coef - y) / np.maximum(y, 1e-9)
    return FitResult(LinearStepModel(tuple(float(c) for c in coef)), len(shapes),
                     float(np.median(rel)), float(np.percentile(rel, 90)))
