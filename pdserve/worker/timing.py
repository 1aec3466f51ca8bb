"""A worker's timing of each prefill, for the router's TTFT breakdown.

Lifecycle of one request's record (:class:`PrefillTimer`):

1. ``received``: the request arrived (its queueing starts).
2. ``on_schedule``: the first step that computes it starts (queueing ends,
   prefill starts). Chunked prompts run over several steps.
3. ``on_layer_done``: the time the wrapped hooks (the KV pusher) take is the
   prefill's compute waiting for the KV transfer; it is charged to every
   request still prefilling in the step, since all of them wait for it.
4. ``finish``: the first token is being reported; the record becomes a
   :class:`~pdserve.worker.protocol.PrefillTiming` and is dropped.
   ``forget`` drops it without a report (abort, failure).

The timer is the engine's :class:`~pdserve.engine.engine.StepHooks`; it
forwards every call to the hooks it wraps (a prefill worker's pusher).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.engine.engine import StepHooks
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.worker.protocol import PrefillTiming


@dataclass
class _Record:
    received_s: float
    handoff: bool = False  # its KV is pushed to another worker (only then is push time its own)
    started_s: float | None = None
    push_s: float = 0.0


class PrefillTimer:
    """Times queueing, compute and KV pushing of every prefill on one worker."""

    def __init__(
        self, inner: StepHooks | None = None, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.inner = inner
        self.clock = clock
        self._records: dict[str, _Record] = {}
        self._in_step: list[_Record] = []  # records of requests the running step prefills

    def received(self, request_id: str, at_s: float | None = None, handoff: bool = True) -> None:
        """A request to prefill arrived (at ``at_s`` on this timer's clock; None: now); ``handoff``:
        its KV goes to another worker (a request served here has no transfer time: the pusher's
        time in a step it shares with a hand-off is compute time to it)."""
        self._records[request_id] = _Record(self.clock() if at_s is None else at_s, handoff)

    def forget(self, request_id: str) -> None:
        """Drop a record without reporting it."""
        self._records.pop(request_id, None)

    def finish(self, request_id: str, first_push_s: float | None = None) -> PrefillTiming | None:
        """The timing of a request whose first token is being reported (None if not timed).

        ``first_push_s``: when (on this timer's clock) its KV push started, if it did.
        """
        record = self._records.pop(request_id, None)
        if record is None:
            return None
        now = self.clock()
        started = record.started_s if record.started_s is not None else now
        return PrefillTiming(
            queue_s=started - record.received_s,
            prefill_s=max(now - started - record.push_s, 0.0),
            kv_push_s=record.push_s,
            span_s=now - record.received_s,
            kv_push_start_s=None if first_push_s is None else first_push_s - record.received_s,
        )

    @property
    def num_pending(self) -> int:
        """Requests received and not yet reported or forgotten."""
        return len(self._records)

    # -- StepHooks -------------------------------------------------------------------

    def on_schedule(self, out: SchedulerOutput) -> None:
        """Start the clock of requests computed for the first time; forward."""
        self._in_step = []
        if self._records:
            now = self.clock()
            for item in out.scheduled:
                record = self._records.get(item.request.request_id)
                if record is not None:
                    if record.started_s is None:
                        record.started_s = now
                    self._in_step.append(record)
        if self.inner is not None:
            self.inner.on_schedule(out)

    def on_layer_done(self, layer: int) -> None:
        """Forward, charging the time it took to the step's prefills."""
        if self.inner is None:
            return
        start = self.clock()
        self.inner.on_layer_done(layer)
        if self._in_step:
            spent = self.clock() - start
            for record in self._in_step:
                if record.handoff:
                    record.push_s += spent
