"""The open-loop load generator: sends a workload on an arrival schedule and records every request.

Lifecycle of a run (:func:`run_load`):

1. Draw the next arrival time and the next request of the workload; stop
   when ``num_requests`` are sent, or at the first arrival past ``duration_s``.
2. Sleep until the arrival time, then start the request as its own task
   (open loop: a slow server does not delay later arrivals). With
   ``max_concurrency`` the task first waits for a free slot; that wait shows
   as the record's send lag, not in its latencies.
3. The first ``warmup_requests`` requests, and those sent in the first
   ``warmup_s`` seconds, are marked warm-up and left out of the aggregates
   (``num_requests`` counts the others).
4. Wait for every request, then summarise (:mod:`~pdserve.bench.metrics`).

A sweep (:func:`run_sweep`) repeats the run at each rate with the same
seeds and reports the highest rate whose SLO attainment reaches the target.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from tqdm import tqdm

from pdserve.bench.arrivals import ArrivalConfig
from pdserve.bench.client import BenchClient, ClientConfig
from pdserve.bench.metrics import SLO, RequestRecord, Summary, summarize
from pdserve.bench.workload import RequestSpec, TokenCounter
from pdserve.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadConfig:
    """How much load, and when.

    Attributes:
        arrivals: the arrival process (its rate is the request rate).
        num_requests: measured requests to send (warm-up requests come on top); or
        duration_s: send for this long (warm-up time included); one of the two must be set.
        max_concurrency: at most this many requests in flight (None: no limit).
        warmup_requests, warmup_s: leading requests / seconds left out of the results.
        progress: show a progress bar on stderr.
    """

    arrivals: ArrivalConfig
    num_requests: int | None = None
    duration_s: float | None = None
    max_concurrency: int | None = None
    warmup_requests: int = 0
    warmup_s: float = 0.0
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.num_requests is None) == (self.duration_s is None):
            raise ConfigError("give exactly one of --num-requests and --duration")
        if self.num_requests is not None and self.num_requests < 1:
            raise ConfigError(f"--num-requests must be ≥ 1, got {self.num_requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ConfigError(f"--duration must be > 0 seconds, got {self.duration_s}")
        if self.duration_s is not None and math.isinf(self.arrivals.rate) and self.max_concurrency is None:
            raise ConfigError("--duration with an infinite rate needs --max-concurrency")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ConfigError(f"--max-concurrency must be ≥ 1, got {self.max_concurrency}")
        if self.warmup_requests < 0 or self.warmup_s < 0:
            raise ConfigError("warm-up must be ≥ 0")


@dataclass
class RunResult:
    """One run: its settings, every request and the aggregates."""

    rate: float
    records: list[RequestRecord]
    summary: Summary
    wall_s: float
    start_s: float = 0.0  # time.perf_counter() at the start: records' times are relative to it


@dataclass
class SweepResult:
    """Runs at several rates and the highest rate meeting the attainment target."""

    runs: list[RunResult]
    target: float
    max_rate: float | None = None
    attainment: dict[float, float] = field(default_factory=dict)


async def run_load(
    client_config: ClientConfig,
    load: LoadConfig,
    requests: Iterator[RequestSpec],
    slo: SLO | None = None,
    counter: TokenCounter | None = None,
) -> RunResult:
    """Send the load (see the module docstring) and return every record with the summary."""
    async with BenchClient(client_config, counter) as client:
        slots = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
        total = None
        if load.num_requests is not None and not load.warmup_s:
            total = load.num_requests + load.warmup_requests
        num_measured = 0
        bar = tqdm(
            total=total,
            unit="req",
            file=sys.stderr,
            disable=not load.progress,
            desc=f"{load.arrivals.rate:g} req/s",
            dynamic_ncols=True,
        )
        records: list[RequestRecord] = []
        tasks: set[asyncio.Task[RequestRecord]] = set()
        start_s = time.perf_counter()

        # With an infinite rate every arrival is due at once: take the slot here, in order, rather
        # than start thousands of tasks that all wait for one.
        slot_in_loop = slots is not None and math.isinf(load.arrivals.rate)

        async def one(spec: RequestSpec, record: RequestRecord) -> RequestRecord:
            try:
                if slots is not None and not slot_in_loop:
                    async with slots:
                        await client.send(spec, record, start_s)
                else:
                    await client.send(spec, record, start_s)
            finally:
                if slot_in_loop:
                    assert slots is not None
                    slots.release()
            bar.update(1)
            return record

        try:
            for index, (offset_s, spec) in enumerate(zip(load.arrivals.offsets_s(), requests, strict=False)):
                if load.num_requests is not None and num_measured >= load.num_requests:
                    break
                if load.duration_s is not None and offset_s >= load.duration_s:
                    break
                if slot_in_loop:
                    assert slots is not None
                    await slots.acquire()
                    if load.duration_s is not None and time.perf_counter() - start_s >= load.duration_s:
                        slots.release()
                        break
                delay_s = start_s + offset_s - time.perf_counter()
                if delay_s > 0:
                    await asyncio.sleep(delay_s)
                warmup = index < load.warmup_requests or time.perf_counter() - start_s < load.warmup_s
                num_measured += not warmup
                record = RequestRecord(index=index, warmup=warmup, scheduled_s=offset_s)
                records.append(record)
                task = asyncio.create_task(one(spec, record))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)
            bar.close()
        wall_s = time.perf_counter() - start_s
    return RunResult(load.arrivals.rate, records, summarize(records, slo), wall_s, start_s)


async def run_sweep(
    client_config: ClientConfig,
    load: LoadConfig,
    rates: list[float],
    make_requests: Callable[[], Iterator[RequestSpec]],
    slo: SLO | None = None,
    counter: TokenCounter | None = None,
    target: float = 0.9,
    on_run: Callable[[RunResult], None] | None = None,
) -> SweepResult:
    """One run per rate, in the order given, each with a fresh workload of the same seed."""
    if not rates:
        raise ConfigError("a sweep needs at least one rate")
    if not 0 < target <= 1:
        raise ConfigError(f"the attainment target must be in (0, 1], got {target}")
    sweep = SweepResult(runs=[], target=target)
    for rate in rates:
        run = await run_load(
            client_config,
            replace(load, arrivals=replace(load.arrivals, rate=rate)),
            make_requests(),
            slo,
            counter,
        )
        sweep.runs.append(run)
        sweep.attainment[rate] = run.summary.attainment
        if on_run is not None:
            on_run(run)
    meeting = [rate for rate, a in sweep.attainment.items() if a >= target]
    sweep.max_rate = max(meeting) if meeting else None
    return sweep
