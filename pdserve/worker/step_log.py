"""A served worker's step times, one JSON line per engine step, for checking the simulator's step model.

``pdserve profile`` fits a step-time model on steps it times in its own
process; the simulator then predicts served runs with it. When a prediction
misses, the question is whether the served worker's steps themselves took
longer than the model says (the model, or the process's speed), or the time
went between steps (serving overhead, interference). With
``PDSERVE_STEP_LOG=DIR`` in its environment (``pdserve serve`` passes its
environment to its workers), every worker appends to ``DIR/<worker id>.jsonl``
one record per step::

    {"t": <monotonic start>, "s": <seconds>, "shape": {<StepShape fields>}}

``s`` runs from the scheduled batch (``on_schedule``) to the end of
``LLMEngine.step`` (the model, sampling, the scheduler's update, detokenising),
as ``pdserve profile`` times a step. ``benchmarks/s8_steps.py`` compares a
log with a profile. Off (no file, no cost) without the variable.

Read back (:func:`read_step_log`), a log also gives the worker loop's own time
between two busy steps (:func:`loop_gap`): what the served worker does after a
step — sending each sampled row's ``Tokens`` message, reading its socket,
scheduling — that the engine timed alone never pays. ``pdserve profile``
measures its serving overhead per token with it (:mod:`pdserve.sim.serving`).
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from pdserve.engine.engine import StepHooks
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.sim.step_model import StepShape, step_shape

ENV = "PDSERVE_STEP_LOG"
#: Two steps further apart than this were separated by idleness, not by the worker loop.
BUSY_GAP_S = 0.05
#: Fewer gaps after multi-row steps than this: no per-row figure (0).
MIN_ROW_GAPS = 5


@dataclass(frozen=True)
class LoggedStep:
    """One record of a step log: its start (``time.perf_counter``), seconds and shape."""

    t: float
    s: float
    shape: StepShape


@dataclass(frozen=True)
class LoopGap:
    """The worker loop's time between two busy steps, by the rows the first one sampled (seconds).

    Attributes:
        per_token_s: median gap after a step that sampled one row.
        per_row_s: what the median gap after a step of several sampled rows adds, per further row
            (≥ 0; 0 with fewer than :data:`MIN_ROW_GAPS` such gaps).
        num_gaps: gaps the figures come from.
    """

    per_token_s: float
    per_row_s: float
    num_gaps: int


def read_step_log(path: Path) -> list[LoggedStep]:
    """The records of one worker's log, in order (a line cut short by the worker's end is skipped)."""
    steps = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            steps.append(LoggedStep(float(rec["t"]), float(rec["s"]), StepShape(**rec["shape"])))
        except (ValueError, KeyError, TypeError):
            continue
    return steps


def loop_gap(steps: list[LoggedStep]) -> LoopGap | None:
    """The loop's time after a step, from consecutive steps at most :data:`BUSY_GAP_S` apart; None when
    no step that sampled one row was followed that closely by another."""
    ones: list[float] = []
    multi: list[tuple[float, int]] = []
    for prev, step in itertools.pairwise(steps):
        gap = step.t - (prev.t + prev.s)
        rows = prev.shape.num_sampled
        if not 0.0 <= gap < BUSY_GAP_S or rows == 0:
            continue
        if rows == 1:
            ones.append(gap)
        else:
            multi.append((gap, rows))
    if not ones:
        return None
    per_token = statistics.median(ones)
    per_row = 0.0
    if len(multi) >= MIN_ROW_GAPS:
        further = statistics.median(r for _, r in multi) - 1
        per_row = max((statistics.median(g for g, _ in multi) - per_token) / max(further, 1), 0.0)
    return LoopGap(per_token, per_row, len(ones) + len(multi))


class StepLog:
    """StepHooks that record each step's shape and time, forwarding every call to ``inner``."""

    def __init__(self, inner: StepHooks, path: Path) -> None:
        self.inner = inner
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = path.open("a", buffering=1)
        self._shape: StepShape | None = None
        self._started = 0.0

    @classmethod
    def from_env(cls, inner: StepHooks, worker_id: str) -> StepLog | None:
        """A log under ``$PDSERVE_STEP_LOG`` (None when it is not set)."""
        root = os.environ.get(ENV)
        return cls(inner, Path(root) / f"{worker_id}.jsonl") if root else None

    def on_schedule(self, out: SchedulerOutput) -> None:
        self._shape = step_shape(out)
        self._started = time.perf_counter()
        self.inner.on_schedule(out)

    def on_layer_done(self, layer: int) -> None:
        self.inner.on_layer_done(layer)

    def step_done(self) -> None:
        """The step ended (call after ``LLMEngine.step`` returns); writes its record."""
        if self._shape is None:
            return  # nothing was scheduled
        seconds = time.perf_counter() - self._started
        self._file.write(json.dumps({"t": round(self._started, 6), "s": round(seconds, 6),
                                     "shape": asdict(self._shape)}) + "\n")
        self._shape = None

    def close(self) -> None:
        """Close the file."""
        self._file.close()
