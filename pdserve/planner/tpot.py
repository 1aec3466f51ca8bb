"""Predicted TPOT attainment: the share of requests whose own mean gap stays within the SLO.

The shape's ITL in :func:`pdserve.planner.predict.predict` is one number: the step time at the
mean decode batch. A request's TPOT (its mean gap) is the step time at the batches it actually
decoded in, and that batch fluctuates: streams arrive at random and stay for their output
lengths, and a larger batch makes every step slower, so everyone stays longer. A decoder whose
mean ITL is inside the SLO can put a large share of its requests past it (S7 measured: one
prefill + one decode worker on chat, TPOT p90 57 ms against a 40.5 ms SLO).

The model. A decoder runs ``b`` streams in steps of ``s(b) = (base + slope·b) · stretch``
(``stretch`` ≥ 1: a mixed worker's prefill share); each step gives every stream one token, so
with outputs of mean ``E[O]`` tokens the requests complete at ``b / (s(b) E[O])`` per second.
Requests arrive as a Poisson stream of rate ``λ``. This is a symmetric (processor-sharing-like)
queue, whose stationary distribution does not depend on the output-length distribution beyond
its mean: the batch-size ``b`` is a birth–death chain with

    π(b) / π(b − 1) = λ · s(b) · E[O] / b        (tail ratio → ρ = λ·E[O]·slope·stretch)

An arriving request sees ``π`` (Poisson arrivals see time averages) and decodes in a batch of
``b + 1``. Over its own decode the batch drifts back towards the mean ``m``: with the batch's
correlation time taken as the mean decode span (``E[O]`` steps), a request of ``O`` tokens sees
the deviation shrunk by ``√g(O/E[O])``, ``g(x) = 2(x − 1 + e^{−x})/x²`` (the variance factor of
a time average under an exponential autocorrelation: 1 for a short request, → 0 for a long one).
So a request of ``O`` tokens that arrives to ``b`` streams has TPOT
``s(1 + m + √g·(b − m))``; its chance to meet the SLO is the ``π``-mass of the ``b`` for which
that is within the limit. The attainment is the mean over the window's sampled output lengths.
Requests of one token have no gap and always meet it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: The batch distribution is summed until its tail carries less than this.
TAIL = 1e-9
MAX_BATCH = 4096


def batch_distribution(lam: float, mean_output: float, base_s: float, slope_s: float,
                       stretch: float = 1.0) -> list[float] | None:
    """``π(b)``, b = 0, 1, ...: the stationary number of streams decoding (module docstring);
    None when the decoder cannot keep up (``ρ ≥ 1``)."""
    if lam <= 0 or mean_output <= 0:
        return [1.0]
    if lam * mean_output * slope_s * stretch >= 1:
        return None
    weights = [1.0]
    total = 1.0
    for b in range(1, MAX_BATCH):
        w = weights[-1] * lam * (base_s + slope_s * b) * stretch * mean_output / b
        weights.append(w)
        total += w
        if b > 2 and w < TAIL * total and w < weights[-2]:
            break
    return [w / total for w in weights]


def _shrink(x: float) -> float:
    """``g(x)``: variance factor of a time average over ``x`` correlation times."""
    if x < 1e-6:
        return 1.0
    return max(min(2 * (x - 1 + math.exp(-x)) / (x * x), 1.0), 0.0)


def tpot_attainment(
    lam: float,
    outputs: Sequence[int],
    base_s: float,
    slope_s: float,
    limit_s: float,
    stretch: float = 1.0,
) -> float:
    """Predicted share of requests whose TPOT is within ``limit_s`` on one decoder.

    Args:
        lam: requests per second reaching this decoder.
        outputs: the window's sampled output lengths (tokens).
        base_s, slope_s: a step takes ``base_s + slope_s·b`` at batch ``b``.
        limit_s: the TPOT SLO.
        stretch: a mixed worker's prefill share stretches every step by this (≥ 1).
    """
    if not math.isfinite(stretch):
        return 0.0
    if not outputs:
        return 1.0 if (base_s + slope_s) * stretch <= limit_s else 0.0
    mean_output = sum(outputs) / len(outputs)
    pi = batch_distribution(lam, mean_output, base_s, slope_s, stretch)
    if pi is None:
        return sum(1.0 for o in outputs if o <= 1) / len(outputs)
    m = sum(b * p for b, p in enumerate(pi))
    # the largest number of *other* streams a request's average batch may hold
    others = (limit_s / stretch - base_s) / slope_s - 1 if slope_s > 0 else math.inf
    cache: dict[float, float] = {}
    total = 0.0
    for o in outputs:
        if o <= 1:
            total += 1.0
            continue
        x = o / mean_output
        if x not in cache:
            root = math.sqrt(_shrink(x))
            if others == math.inf:
                cache[x] = 1.0 if base_s * stretch <= limit_s else 0.0
            else:
                cache[x] = sum(p for b, p in enumerate(pi) if m + root * (b - m) <= others)
        total += cache[x]
    return total / len(outputs)
