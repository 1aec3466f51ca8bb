"""Serving overhead: what a served request costs beyond its engine steps (measured by ``pdserve profile``).

The step model times ``LLMEngine.step()`` alone. A request served through
``pdserve serve`` also pays the client's HTTP request, the router's
tokenisation and placement, the router↔worker messages, the worker loop's
per-output work (a ``Tokens`` message per request and step) and the
router's streaming of each token back (detokenisation, an SSE event) — on a
small CPU machine the last two compete with the worker's own threads.

How it is measured (:func:`measure_serving`): a real deployment (router + one
mixed worker with the profile's engine options and threads, started as
``pdserve serve`` starts them) serves a few requests one at a time on the
otherwise idle machine, through the bench's HTTP client. The same requests
(prompt and output lengths from the server's usage) are simulated alone on
one worker with the fitted step model and no overhead. Then
(:func:`derive_overhead`):

- ``per_token_s`` = median over requests of (measured − simulated) typical
  inter-token time (the median gap between streamed tokens, so that a step
  stretched by another request's prompt does not count): the cost of one
  sampled token beyond its step;
- ``first_token_s`` = median of (measured − simulated) TTFT, less
  ``per_token_s`` (the first token pays that too): the cost before the first
  token;
- then :data:`BATCH` requests are sent together (they decode as one batch):
  ``per_row_s`` = (their median inter-token gap − ``per_token_s``) /
  (batch − 1), the cost of each further row a step samples.

``first_token_s`` and ``per_row_s`` are clamped at 0; ``per_token_s`` keeps its sign:
negative, the served worker's steps are faster than the profiled engine's
(the step model is corrected down by it, a step's time never below 0) —
clamped at 0 it would drop exactly that evidence. With a KV link profiled, the same is done on a
router + 1 prefill + 1 decode worker with every request handed off: the
hand-off overhead (the reservation round trip, the gate, the "done" notice,
the decode worker's loop).

Where the simulator puts them: ``first_token_s`` of the mixed worker is the
router's per-request work (``SimConfig.request_overhead_s``, before
placement); what a hand-off's costs more is added to hand-offs only
(``SimConfig.handoff_overhead_s``); a step that samples ``n`` tokens takes
``per_token_s + (n − 1)·per_row_s`` more (:class:`ServedStepModel`,
:func:`apply_serving`) — a decode worker's with the hand-off figures, every
other worker's with the mixed worker's
(:meth:`pdserve.sim.profile.Profile.pool_step_model`).
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from pdserve.bench.metrics import RequestRecord
from pdserve.config import Role, SchedulerConfig
from pdserve.sim.link import LinkModel
from pdserve.sim.spec import PoolSpec
from pdserve.sim.step_model import StepModel, StepShape

#: Requests served to measure the overhead (after one warm-up), and their lengths.
NUM_REQUESTS = 9
PROMPT_TOKENS = (48, 160, 400)
OUTPUT_TOKENS = 24
#: Then this many requests of 160 prompt tokens sent together: they decode as one batch.
BATCH = 4
#: Last, this many requests (prompts uniform over PROMPT_TOKENS' range, OUTPUT_TOKENS out) at Poisson
#: arrivals of this rate (seeded): about two streams in flight, prompts arriving while others decode.
LOADED_REQUESTS = 12
LOADED_RATE = 4.0
#: The loaded figure's estimator (kept in the profile): the median TTFT gap of the loaded requests that
#: found no other request before its first token, served and simulated. Profiles without it used the
#: median over every loaded request, which queueing biases (see :func:`derive_loaded`): not used.
LOADED_ESTIMATOR = "unqueued-median"
#: Fewer unqueued loaded requests than this: no loaded figure beyond the idle one.
MIN_UNQUEUED = 3


@dataclass(frozen=True)
class ServingOverhead:
    """Per-request costs of serving beyond the engine's steps (seconds).

    Attributes:
        first_token_s: before the first token (HTTP, router, messages, delivery).
        per_token_s: added to a step that samples a token (one request's token at batch 1); negative
            when the served worker's steps were faster than the profiled engine's.
        per_row_s: added for every further row the step samples (the batch's other requests).
        num_requests: requests the figures come from.
        method: how they were measured (one line, for the profile's reader).
        first_token_loaded_s: before the first token when requests arrive while others are served
            (Poisson arrivals, :data:`LOADED_RATE`), beyond what the simulator with the figures above
            predicts for those arrivals; None in profiles taken before it was measured.
        loaded_estimator: how ``first_token_loaded_s`` was estimated: :data:`LOADED_ESTIMATOR`, or ""
            for the queue-biased median of profiles taken before it (not used: see :attr:`per_request_s`).
    """

    first_token_s: float
    per_token_s: float
    per_row_s: float = 0.0
    num_requests: int = 0
    method: str = ""
    first_token_loaded_s: float | None = None
    loaded_estimator: str = ""

    @property
    def loaded_usable(self) -> bool:
        """A loaded figure measured with :data:`LOADED_ESTIMATOR` (not the queue-biased one before it)."""
        return self.first_token_loaded_s is not None and self.loaded_estimator == LOADED_ESTIMATOR

    @property
    def per_request_s(self) -> float:
        """What a simulated request waits before placement: the loaded figure when it was measured
        with :data:`LOADED_ESTIMATOR`, else the idle one."""
        if self.first_token_loaded_s is None or not self.loaded_usable:
            return self.first_token_s
        return self.first_token_loaded_s

    def to_json(self) -> dict[str, Any]:
        """The profile's ``serving_overhead`` entry."""
        return {"first_token_s": self.first_token_s, "per_token_s": self.per_token_s,
                "per_row_s": self.per_row_s, "num_requests": self.num_requests, "method": self.method,
                **({"first_token_loaded_s": self.first_token_loaded_s,
                    "first_token_loaded_estimator": self.loaded_estimator}
                   if self.first_token_loaded_s is not None else {})}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServingOverhead:
        """Inverse of :meth:`to_json`."""
        loaded = data.get("first_token_loaded_s")
        return cls(float(data["first_token_s"]), float(data["per_token_s"]),
                   float(data.get("per_row_s", 0.0)), int(data.get("num_requests", 0)),
                   str(data.get("method", "")), None if loaded is None else float(loaded),
                   str(data.get("first_token_loaded_estimator", "")))


@dataclass(frozen=True)
class ServedStepModel:
    """A step model plus the serving work of the tokens a step samples:
    ``per_token_s`` once and ``per_row_s`` for every row beyond the first."""

    inner: StepModel
    per_token_s: float
    per_row_s: float = 0.0

    def step_time_s(self, shape: StepShape) -> float:
        """The engine step's time and the serving work of its tokens."""
        n = shape.num_sampled
        extra = self.per_token_s + self.per_row_s * (n - 1) if n else 0.0
        return max(self.inner.step_time_s(shape) + extra, 0.0)


def apply_serving(step_model: StepModel, overhead: ServingOverhead | None) -> StepModel:
    """The step model a simulated worker uses: with the per-token overhead when one was measured."""
    if overhead is None or (overhead.per_token_s == 0 and overhead.per_row_s <= 0):
        return step_model
    return ServedStepModel(step_model, overhead.per_token_s, overhead.per_row_s)


def _itl_s(r: RequestRecord) -> float | None:
    """The request's typical time between tokens: the median gap between its streamed chunks (per token),
    so that one long step (another request's prompt computed meanwhile) does not count; the mean
    when the chunks were not recorded."""
    if len(r.chunk_s) >= 2 and len(r.chunk_tokens) == len(r.chunk_s):
        times, tokens = r.chunk_s, r.chunk_tokens
        gaps = [(b - a) / max(n, 1) for a, b, n in zip(times, times[1:], tokens[1:], strict=False)]
        return statistics.median(gaps)
    if r.ttft_s is None or r.e2e_s is None or r.num_output_tokens < 2:
        return None
    return (r.e2e_s - r.ttft_s) / (r.num_output_tokens - 1)


def _gaps(measured: Sequence[RequestRecord], simulated: Sequence[RequestRecord]
          ) -> tuple[list[float], list[float]]:
    """(TTFT gaps, mean inter-token gaps), served − simulated, pairwise."""
    if len(measured) != len(simulated):
        raise ValueError(f"{len(measured)} measured records but {len(simulated)} simulated ones")
    ttft_gaps, token_gaps = [], []
    for m, s in zip(measured, simulated, strict=True):
        if m.ttft_s is None or s.ttft_s is None:
            continue
        ttft_gaps.append(m.ttft_s - s.ttft_s)
        mi, si = _itl_s(m), _itl_s(s)
        if mi is not None and si is not None:
            token_gaps.append(mi - si)
    return ttft_gaps, token_gaps


def derive_overhead(measured: Sequence[RequestRecord], simulated: Sequence[RequestRecord], method: str = "",
                    measured_batch: Sequence[RequestRecord] = (),
                    simulated_batch: Sequence[RequestRecord] = (), batch: int = BATCH) -> ServingOverhead:
    """The overhead from the same requests served (``measured``: one at a time; ``measured_batch``:
    ``batch`` sent together) and simulated without overhead (pairwise, in the same order).

    ``per_token_s``: the median inter-token gap alone; ``per_row_s``: what the batch's median gap adds
    over it, per further row; ``first_token_s``: the median TTFT gap alone, less ``per_token_s``.
    """
    ttft_gaps, token_gaps = _gaps(measured, simulated)
    if not ttft_gaps:
        raise ValueError("no request was served: no overhead can be measured")
    per_token = statistics.median(token_gaps) if token_gaps else 0.0  # signed: see the module doc
    per_row = 0.0
    _, batch_gaps = _gaps(measured_batch, simulated_batch)
    if batch_gaps and batch > 1:
        per_row = max((statistics.median(batch_gaps) - per_token) / (batch - 1), 0.0)
    first = max(statistics.median(ttft_gaps) - per_token, 0.0)
    return ServingOverhead(first, per_token, per_row, len(ttft_gaps) + len(batch_gaps), method)


def unqueued(records: Sequence[RequestRecord]) -> list[bool]:
    """For each request: whether it was sent when no other request was still before its first token
    (nothing queued ahead of it, nothing whose prompt it could wait behind)."""
    spans = [None if r.ttft_s is None else (r.sent_s, r.sent_s + r.ttft_s) for r in records]
    return [span is not None and not any(j != i and other is not None and other[0] <= span[0] < other[1]
                                         for j, other in enumerate(spans))
            for i, span in enumerate(spans)]


def derive_loaded(measured: Sequence[RequestRecord], simulated: Sequence[RequestRecord]) -> tuple[float, int]:
    """``first_token_loaded_s`` beyond the idle figure, and how many requests it comes from: the median
    TTFT gap, served − simulated, of the requests sent at their arrival times while others were served
    that found no other request before its first token, in the served run and in the simulated one
    (:func:`unqueued`; the simulation already has the per-token figures and the idle
    ``first_token_s``: this is what remains; at least 0). Fewer than :data:`MIN_UNQUEUED` such
    requests: 0.

    Why not the median over every loaded request (the estimator before): a request that waits behind
    others pays their shortfall too — every served step the model predicts ε too fast delays all the
    requests queued behind it — so the gap of a queued request grows with the queue ahead of it and
    its median measures the probe's queueing, not a per-request cost (at 4 requests/s it gave 76 ms
    for a one-thread hand-off whose idle figure is 5 ms, 1.9 s for a two-thread one).
    """
    if not _gaps(measured, simulated)[0]:
        raise ValueError("no loaded request was served: no loaded overhead can be measured")
    alone = [a and b for a, b in zip(unqueued(measured), unqueued(simulated), strict=True)]
    gaps, _ = _gaps([m for m, ok in zip(measured, alone, strict=True) if ok],
                    [s for s, ok in zip(simulated, alone, strict=True) if ok])
    if len(gaps) < MIN_UNQUEUED:
        return 0.0, len(gaps)
    return max(statistics.median(gaps), 0.0), len(gaps)


def simulate_alone(records: Sequence[RequestRecord], pools: tuple[PoolSpec, ...], scheduler: SchedulerConfig,
                   block_size: int, max_model_len: int, vocab_size: int, num_layers: int = 1,
                   kv_bytes_per_token: int = 0, together: bool = False,
                   at_sent: bool = False, request_overhead_s: float = 0.0) -> list[RequestRecord]:
    """The served requests (their usage's lengths) one at a time (``together``: all at once;
    ``at_sent``: each at its ``sent_s``, as it was served) on ``pools``, no overhead but
    ``request_overhead_s`` (every request handed off when there is a prefill pool, as
    ``--disagg-policy always`` does)."""
    from pdserve.sim.simulator import SimConfig, SimRequest, Simulator

    rng = random.Random(0)

    def prompt(n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(3, vocab_size) for _ in range(n))

    def arrival(i: int, r: RequestRecord) -> float:
        return r.sent_s if at_sent else 0.0 if together else 1000.0 * i

    requests = [SimRequest(arrival(i, r), prompt(r.num_prompt_tokens), max(r.num_output_tokens, 1))
                for i, r in enumerate(records)]
    disagg = any(p.role is Role.PREFILL for p in pools)
    config = SimConfig(pools=pools, scheduler=scheduler, block_size=block_size, enable_prefix_caching=False,
                       max_model_len=max_model_len, num_layers=num_layers,
                       kv_bytes_per_token=kv_bytes_per_token,
                       disagg_policy="always" if disagg else "auto", hop_s=0.0,
                       request_overhead_s=request_overhead_s)
    return Simulator(config).run(requests).records


@dataclass(frozen=True)
class ServedModel:
    """What :func:`measure_serving` needs to know of the profiled worker."""

    model: str
    worker_args: list[str]
    threads: int
    step_model: StepModel
    scheduler: SchedulerConfig
    block_size: int
    num_blocks: int
    max_model_len: int
    vocab_size: int
    num_layers: int = 1
    kv_bytes_per_token: int = 0


def serve(w: ServedModel, disaggregated: bool
          ) -> tuple[list[RequestRecord], list[RequestRecord], list[RequestRecord]]:
    """Through a real deployment (router + 1 mixed worker, or router + 1 prefill + 1 decode worker
    with every request handed off) started as ``pdserve serve`` starts one: requests of
    :data:`PROMPT_TOKENS` × :data:`OUTPUT_TOKENS` one at a time, then :data:`BATCH` sent together,
    then :data:`LOADED_REQUESTS` at Poisson arrivals; the ended requests' records of each part."""
    from pdserve.bench.arrivals import ArrivalConfig
    from pdserve.bench.client import ClientConfig
    from pdserve.bench.runner import LoadConfig, run_load
    from pdserve.bench.workload import WorkloadConfig, make_counter, make_workload
    from pdserve.launch.local import LaunchConfig, LocalLauncher

    router = ["--model", w.model, *(["--disagg-policy", "always"] if disaggregated else [])]
    launcher = LocalLauncher(LaunchConfig(
        mode="disaggregated" if disaggregated else "aggregated", num_prefill=1, num_decode=1, num_mixed=1,
        port=0, router_args=router, worker_args=["--model", w.model, *w.worker_args],
        threads_per_worker=w.threads, ready_timeout_s=300))
    counter = make_counter(w.model)
    records: list[RequestRecord] = []
    try:
        launcher.start()
        client = ClientConfig(base_url=launcher.url, model=w.model, extra_body={"temperature": 0.0})
        for i, n in enumerate(PROMPT_TOKENS):
            workload = WorkloadConfig(kind="synthetic", input_len=str(n), output_len=str(OUTPUT_TOKENS),
                                      seed=i)
            load = LoadConfig(arrivals=ArrivalConfig(rate=math.inf),
                              num_requests=NUM_REQUESTS // len(PROMPT_TOKENS), max_concurrency=1,
                              warmup_requests=1, progress=False)
            run = asyncio.run(run_load(client, load, make_workload(workload, counter), None, counter))
            records += [r for r in run.records if not r.warmup and r.error_type is None]
        workload = WorkloadConfig(kind="synthetic", input_len=str(PROMPT_TOKENS[1]),
                                  output_len=str(OUTPUT_TOKENS), seed=len(PROMPT_TOKENS))
        load = LoadConfig(arrivals=ArrivalConfig(rate=math.inf), num_requests=BATCH, max_concurrency=BATCH,
                          progress=False)
        run = asyncio.run(run_load(client, load, make_workload(workload, counter), None, counter))
        batch = [r for r in run.records if r.error_type is None]
        spread = f"uniform:{PROMPT_TOKENS[0]}:{PROMPT_TOKENS[-1]}"
        workload = WorkloadConfig(kind="synthetic", input_len=spread, output_len=str(OUTPUT_TOKENS),
                                  seed=len(PROMPT_TOKENS) + 1)
        load = LoadConfig(arrivals=ArrivalConfig(rate=LOADED_RATE, seed=0), num_requests=LOADED_REQUESTS,
                          progress=False)
        run = asyncio.run(run_load(client, load, make_workload(workload, counter), None, counter))
        loaded = [r for r in run.records if r.error_type is None]
    finally:
        launcher.stop()
    return records, batch, loaded


def measure_serving(w: ServedModel, link: LinkModel | None = None
                    ) -> tuple[ServingOverhead, ServingOverhead | None]:
    """The overhead of a mixed worker's own requests, and (with ``link``, the profiled KV link) that of
    hand-offs from a prefill worker to a decode worker; see the module doc."""
    lengths = "/".join(map(str, PROMPT_TOKENS))
    results: list[ServingOverhead] = []
    for disagg in (False, True) if link is not None else (False,):
        records, batch, loaded = serve(w, disagg)

        def pools_of(step: StepModel, disagg: bool = disagg) -> tuple[PoolSpec, ...]:
            return ((PoolSpec(Role.PREFILL, 1, step, w.num_blocks, link=link),
                     PoolSpec(Role.DECODE, 1, step, w.num_blocks)) if disagg
                    else (PoolSpec(Role.MIXED, 1, step, w.num_blocks),))

        rest = (w.scheduler, w.block_size, w.max_model_len, w.vocab_size, w.num_layers, w.kv_bytes_per_token)
        simulated = simulate_alone(records, pools_of(w.step_model), *rest)
        simulated_batch = simulate_alone(batch, pools_of(w.step_model), *rest, together=True)
        shape = "1 prefill + 1 decode worker, every request handed off" if disagg else "1 mixed worker"
        method = (f"{len(records)} requests ({lengths} prompt tokens, {OUTPUT_TOKENS} out) one at a time, "
                  f"then {len(batch)} together ({PROMPT_TOKENS[1]} prompt tokens), through a router + "
                  f"{shape} "
                  f"(× {w.threads} threads) on this machine, minus the same requests simulated with the "
                  f"fitted step model; medians")
        idle = derive_overhead(records, simulated, method, batch, simulated_batch, len(batch))
        # the loaded requests, simulated at their send times with the figures just derived
        simulated_loaded = simulate_alone(loaded, pools_of(apply_serving(w.step_model, idle)), *rest,
                                          at_sent=True, request_overhead_s=idle.first_token_s)
        extra, used = derive_loaded(loaded, simulated_loaded) if loaded else (None, 0)
        total = None if extra is None else idle.first_token_s + extra
        results.append(replace(idle, first_token_loaded_s=total, loaded_estimator=LOADED_ESTIMATOR,
                               num_requests=idle.num_requests + len(loaded),
                               method=f"{method}; then {len(loaded)} at Poisson arrivals ({LOADED_RATE:g}/s, "
                                      f"prompts {PROMPT_TOKENS[0]}-{PROMPT_TOKENS[-1]}), simulated at their "
                                      f"send times with the figures above; the loaded figure from the "
                                      f"{used} of them that found no other request before its first token "
                                      f"(served and simulated; at least {MIN_UNQUEUED}, else none)"))
    return results[0], results[1] if len(results) > 1 else None
