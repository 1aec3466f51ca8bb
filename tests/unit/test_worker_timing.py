"""PrefillTimer on a hand-driven clock: queueing, chunked compute, and KV pushing charged to prefills."""

from __future__ import annotations

import pytest

from pdserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from pdserve.request import Request
from pdserve.sampling_params import SamplingParams
from pdserve.worker.timing import PrefillTimer


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class SlowPusher:
    """Inner hooks whose every layer push takes ``push_s`` of the clock."""

    def __init__(self, clock: Clock, push_s: float) -> None:
        self.clock, self.push_s = clock, push_s
        self.scheduled: list[list[str]] = []
        self.layers: list[int] = []

    def on_schedule(self, out: SchedulerOutput) -> None:
        self.scheduled.append([s.request.request_id for s in out.scheduled])

    def on_layer_done(self, layer: int) -> None:
        self.layers.append(layer)
        self.clock.t += self.push_s


def batch(*rids: str) -> SchedulerOutput:
    return SchedulerOutput(
        scheduled=[ScheduledRequest(Request(rid, [1, 2, 3], SamplingParams()), 3, []) for rid in rids]
    )


def step(timer: PrefillTimer, clock: Clock, out: SchedulerOutput, compute_s: float, layers: int = 2) -> None:
    timer.on_schedule(out)
    for layer in range(layers):
        clock.t += compute_s / layers
        timer.on_layer_done(layer)


def test_queue_compute_and_push_of_a_chunked_prefill() -> None:
    clock = Clock()
    pusher = SlowPusher(clock, push_s=0.001)
    timer = PrefillTimer(pusher, clock)
    timer.received("a")
    clock.t = 0.004
    step(timer, clock, batch("x"), compute_s=0.010)  # another request's step: "a" still queues
    step(timer, clock, batch("a", "x"), compute_s=0.020)  # first chunk of "a" (starts at 16 ms)
    step(timer, clock, batch("a"), compute_s=0.020)  # last chunk
    clock.t += 0.0005
    timing = timer.finish("a", first_push_s=0.017)
    assert timing is not None
    assert timing.queue_s == pytest.approx(0.016)
    assert timing.kv_push_s == pytest.approx(0.004)  # 2 layers × 2 steps × 1 ms
    assert timing.prefill_s == pytest.approx(0.0405)  # 40 ms compute + 0.5 ms until reported
    assert timing.span_s == pytest.approx(timing.queue_s + timing.prefill_s + timing.kv_push_s)
    assert timing.kv_push_start_s == pytest.approx(0.017)
    assert pusher.scheduled == [["x"], ["a", "x"], ["a"]] and pusher.layers == [0, 1] * 3  # forwarded
    assert timer.finish("a") is None and timer.num_pending == 0  # reported once


def test_a_timer_without_inner_hooks_charges_no_transfer() -> None:
    clock = Clock()
    timer = PrefillTimer(clock=clock)
    timer.received("m")
    step(timer, clock, batch("m"), compute_s=0.030)
    timing = timer.finish("m")
    assert timing is not None
    assert timing.queue_s == 0 and timing.kv_push_s == 0 and timing.prefill_s == pytest.approx(0.030)
    assert timing.kv_push_start_s is None


def test_forgotten_and_unknown_requests_report_nothing() -> None:
    timer = PrefillTimer(clock=Clock())
    timer.received("gone")
    timer.forget("gone")
    assert timer.finish("gone") is None and timer.finish("never") is None and timer.num_pending == 0


def test_setup_before_queueing_counts_as_queue() -> None:
    clock = Clock()
    timer = PrefillTimer(clock=clock)
    clock.t = 0.020  # e.g. the first connection to the decode peer took 20 ms
    timer.received("s", at_s=0.0)
    step(timer, clock, batch("s"), compute_s=0.010)
    timing = timer.finish("s")
    assert timing is not None
    assert timing.queue_s == pytest.approx(0.020) and timing.span_s == pytest.approx(0.030)


def test_a_request_served_here_is_charged_no_push_time() -> None:
    """A mixed worker pushes a hand-off's KV in a step that also computes its own request: the push
    is the hand-off's transfer time, and compute time to the local request (its transfer stays 0)."""
    clock = Clock()
    timer = PrefillTimer(SlowPusher(clock, push_s=0.001), clock)
    timer.received("mine", handoff=False)
    timer.received("theirs")
    step(timer, clock, batch("mine", "theirs"), compute_s=0.010)
    mine, theirs = timer.finish("mine"), timer.finish("theirs")
    assert mine is not None and theirs is not None
    assert mine.kv_push_s == 0 and theirs.kv_push_s == pytest.approx(0.002)
    assert mine.prefill_s == pytest.approx(0.012)  # the push slowed its step: compute to it
