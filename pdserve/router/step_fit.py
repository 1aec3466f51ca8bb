"""A worker's prefill time as a fixed cost per step plus a cost per prompt token.

Tokens per second of prefill (prompt tokens over the time of the steps that
computed them) depends on what was computed: a step costs ~20 ms before its
first token on ``bench-50m`` here, so a worker that computed 400-token
documents measures ~1,700 tokens/s and one that computed 48-token follow-ups
~900, on the same hardware. Fed back into routing, the worker that happened
to compute the documents looked twice as fast, won every new document and
held most of them (S6's default load: 34, 12 and 10 prompts on three equal
prefill workers). This fit separates the two costs,

    busy_s = step_s · steps + token_s · tokens,

by least squares over the heartbeat intervals (each interval's growth of the
counters is one sample), with older intervals weighted down by ``FORGET``
each. Both coefficients are determined only when the samples differ in
tokens per step; when they do not (a worker that only computed one kind of
prompt), :meth:`StepFit.solve` says so. The router prices every worker of a
pool by the pool's fit (all its workers' samples merged, see ``Placer``):
one model on one kind of hardware costs the same per step and per token
wherever it runs, and a worker priced by its own few samples can look slower
by noise alone, lose every new prompt and so never be measured again.

The same fit prices decode steps, with sequences in the batch for tokens
(``busy_s = base_s · steps + seq_s · sequences``, ``WorkerPerf.decode_fit``):
a worker's own mean decode step says which batches it happened to run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

FORGET = 0.95  # weight left to a sample after each newer one
MIN_WEIGHT = 3.0  # samples (weighted) before a fit is trusted
MAX_COLLINEAR = 0.995  # cos² between the steps and tokens columns above which the fit is ill-posed


@dataclass
class StepFit:
    """Running normal equations of ``busy_s = step_s · steps + token_s · tokens``."""

    ss: float = 0.0  # Σ steps²
    st: float = 0.0  # Σ steps · tokens
    tt: float = 0.0  # Σ tokens²
    sb: float = 0.0  # Σ steps · busy
    tb: float = 0.0  # Σ tokens · busy
    weight: float = 0.0  # Σ weights (samples, older ones discounted)

    def add(self, steps: int, tokens: int, busy_s: float) -> None:
        """One interval: ``steps`` prefill steps computed ``tokens`` prompt tokens in ``busy_s``."""
        if steps <= 0 or tokens <= 0 or busy_s <= 0:
            return
        f = FORGET
        self.ss = f * self.ss + steps * steps
        self.st = f * self.st + steps * tokens
        self.tt = f * self.tt + tokens * tokens
        self.sb = f * self.sb + steps * busy_s
        self.tb = f * self.tb + tokens * busy_s
        self.weight = f * self.weight + 1.0

    @staticmethod
    def merged(fits: Iterable[StepFit]) -> StepFit:
        """The fit of all these workers' samples together (a pool's)."""
        out = StepFit()
        for f in fits:
            out.ss += f.ss
            out.st += f.st
            out.tt += f.tt
            out.sb += f.sb
            out.tb += f.tb
            out.weight += f.weight
        return out

    def solve(self) -> tuple[float, float] | None:
        """``(step_s, token_s)``, or None while the samples cannot tell the two apart.

        A negative step cost (noise around a near-zero one) is read as zero
        and the token cost refitted alone; a non-positive token cost is no fit.
        """
        if self.weight < MIN_WEIGHT or self.ss <= 0 or self.tt <= 0:
            return None
        if self.st * self.st > MAX_COLLINEAR * self.ss * self.tt:
            return None
        det = self.ss * self.tt - self.st * self.st
        step_s = (self.sb * self.tt - self.tb * self.st) / det
        token_s = (self.tb * self.ss - self.sb * self.st) / det
        if step_s < 0:
            step_s, token_s = 0.0, self.tb / self.tt
        if token_s <= 0:
            return None
        return step_s, token_s
