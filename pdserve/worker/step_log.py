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
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from pdserve.engine.engine import StepHooks
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.sim.step_model import StepShape, step_shape

ENV = "PDSERVE_STEP_LOG"


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
