"""Serving overhead: what a served request costs beyond its engine steps (measured by ``pdserve profile``).

The step model times ``LLMEngine.step()`` alone. A request served through
``pdserve serve`` also pays the client's HTTP request, the router's
tokenisation and placement, the router↔worker messages, the worker loop's
per-output work (a ``Tokens`` message per request and step) and the
router's streaming of each token back (detokenisation, an SSE event) — on a
small CPU machine the last two compete with the worker's own threads.

How it is measured (:func:`pdserve.sim.serving_probe.measure_serving`): a real deployment (router + one
mixed worker with the profile's engine options and threads, started as
``pdserve serve`` starts them) serves a few requests one at a time on the
otherwise idle machine, through the bench's HTTP client. The same requests
(prompt and output lengths from the server's usage) are simulated alone on
one worker with the fitted step model and no overhead. Then
(:func:`derive_overhead`):

- ``per_token_s`` = the served worker loop's median time between two busy
  steps after a step that sampled one row, read from the worker's own step
  log (:func:`pdserve.worker.step_log.loop_gap`): sending the row's
  ``Tokens`` message, reading the socket, scheduling — what the engine timed
  alone never pays; ``per_row_s`` = what that gap adds per further sampled
  row (the requests' :data:`BATCH` sent together give such steps);
- ``first_token_s`` = median of (measured − simulated) TTFT, less
  ``per_token_s`` (the first token pays that too): the cost before the first
  token. Each measured TTFT is first reduced by what the served prompt steps
  within it (the prompt worker's step log, :func:`prompt_step_excess`) took
  over the step model: otherwise the probe process's own speed enters the
  figure, as it did the per-token one (a 160-token prompt step of ~60 ms
  run 8 % slow adds ~5 ms; the nine per-cell profiles of the S8 run of
  2026-12-07 03:41 measured 0.0–9.3 ms uncorrected, clamped at 0). The
  uncorrected figure is kept as ``probe_first_token_s``; profiles with
  ``first_token_method`` are corrected. The loaded figure is corrected the
  same way.

Why not the served streams' own pace (the estimator before, still recorded as
``probe_per_token_s``: the median gap between streamed tokens, served −
simulated): it folds in the probe worker's own speed, and a process's speed
differs from the next one's by ±8 % on this machine (the same batch-1 decode
step: 7.8–8.9 ms in six fresh processes). Two profiles taken 15 minutes
apart measured −1.15 and +0.18 ms per token with it, while the served
workers of the S8 run beside the first stepped at the model's speed
(0.96–0.99×): a correction taken from one process added another process's
noise to every simulated step. The loop's gap differs far less between
processes (0.22–0.27 ms in that run's four one-thread workers). Profiles
without ``per_token_method`` hold the old figure (used as it is).

``first_token_s`` and ``per_row_s`` are clamped at 0; an old profile's
``per_token_s`` may be negative (the step model corrected down by it, a
step's time never below 0). With a KV link profiled, the same is done on a
router + 1 prefill + 1 decode worker with every request handed off (the
decode worker's loop; the hand-off overhead: the reservation round trip, the
gate, the "done" notice).

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

import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from pdserve.bench.metrics import RequestRecord
from pdserve.config import Role, SchedulerConfig
from pdserve.sim.colocation import step_kind
from pdserve.sim.spec import PoolSpec
from pdserve.sim.step_model import StepModel, StepShape

if TYPE_CHECKING:
    from pdserve.worker.step_log import LoggedStep, LoopGap

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
#: ``per_token_method`` of profiles whose per-token figures are the served worker loop's gap.
PER_TOKEN_METHOD = "loop-gap"
#: ``first_token_method`` of profiles whose TTFT gaps were corrected by the served prompt steps' times.
FIRST_TOKEN_METHOD = "prompt-steps-logged"


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
        per_token_method: :data:`PER_TOKEN_METHOD` when ``per_token_s``/``per_row_s`` are the served
            worker loop's gap (its step log); "" in older profiles (the streams' pace, see the module doc).
        probe_per_token_s: the streams' pace estimate (served − simulated median gap between tokens),
            recorded for the reader, not used: it includes the probe process's own speed.
        first_token_method: :data:`FIRST_TOKEN_METHOD` when the TTFT gaps behind ``first_token_s``
            (and the loaded figure) were corrected by the served prompt steps' own times from the
            step log; "" in older profiles.
        probe_first_token_s: the uncorrected ``first_token_s``, recorded for the reader, not used.
    """

    first_token_s: float
    per_token_s: float
    per_row_s: float = 0.0
    num_requests: int = 0
    method: str = ""
    first_token_loaded_s: float | None = None
    loaded_estimator: str = ""
    per_token_method: str = ""
    probe_per_token_s: float | None = None
    first_token_method: str = ""
    probe_first_token_s: float | None = None

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
                   if self.first_token_loaded_s is not None else {}),
                **({"per_token_method": self.per_token_method, "probe_per_token_s": self.probe_per_token_s}
                   if self.per_token_method else {}),
                **({"first_token_method": self.first_token_method,
                    "probe_first_token_s": self.probe_first_token_s} if self.first_token_method else {})}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServingOverhead:
        """Inverse of :meth:`to_json`."""
        loaded = data.get("first_token_loaded_s")
        return cls(float(data["first_token_s"]), float(data["per_token_s"]),
                   float(data.get("per_row_s", 0.0)), int(data.get("num_requests", 0)),
                   str(data.get("method", "")), None if loaded is None else float(loaded),
                   str(data.get("first_token_loaded_estimator", "")), str(data.get("per_token_method", "")),
                   None if data.get("probe_per_token_s") is None else float(data["probe_per_token_s"]),
                   str(data.get("first_token_method", "")),
                   None if data.get("probe_first_token_s") is None else float(data["probe_first_token_s"]))


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
                    simulated_batch: Sequence[RequestRecord] = (), batch: int = BATCH,
                    gap: LoopGap | None = None) -> ServingOverhead:
    """The overhead from the same requests served (``measured``: one at a time; ``measured_batch``:
    ``batch`` sent together) and simulated without overhead (pairwise, in the same order).

    With ``gap`` (the served worker's step log): ``per_token_s``/``per_row_s`` are its loop's gap, and
    the streams' pace below is kept as ``probe_per_token_s`` only. Without: ``per_token_s`` is the
    median inter-token gap alone and ``per_row_s`` what the batch's median gap adds over it, per
    further row (the old estimator). ``first_token_s``: the median TTFT gap alone, less ``per_token_s``.
    """
    ttft_gaps, token_gaps = _gaps(measured, simulated)
    if not ttft_gaps:
        raise ValueError("no request was served: no overhead can be measured")
    per_token = statistics.median(token_gaps) if token_gaps else 0.0  # signed: see the module doc
    per_row = 0.0
    _, batch_gaps = _gaps(measured_batch, simulated_batch)
    if batch_gaps and batch > 1:
        per_row = max((statistics.median(batch_gaps) - per_token) / (batch - 1), 0.0)
    count = len(ttft_gaps) + len(batch_gaps)
    if gap is not None:
        first = max(statistics.median(ttft_gaps) - gap.per_token_s, 0.0)
        return ServingOverhead(first, gap.per_token_s, gap.per_row_s, count, method,
                               per_token_method=PER_TOKEN_METHOD, probe_per_token_s=per_token)
    first = max(statistics.median(ttft_gaps) - per_token, 0.0)
    return ServingOverhead(first, per_token, per_row, count, method)


def prompt_step_excess(records: Sequence[RequestRecord], steps: Sequence[LoggedStep], model: StepModel
                       ) -> list[float]:
    """Per served record (``sent_s`` on the host's ``time.perf_counter``, as the step log's ``t``): the
    logged steps that computed prompt tokens within [sent, sent + TTFT], served − ``model`` seconds summed
    — how much slower (> 0) or faster than the profile's model this process ran the request's prompt;
    0.0 for a record without a TTFT or without such a step."""
    prompt = [st for st in steps if step_kind(st.shape) == "prefill"]
    out = []
    for r in records:
        if r.ttft_s is None:
            out.append(0.0)
            continue
        t0, t1 = r.sent_s, r.sent_s + r.ttft_s
        out.append(sum(st.s - model.step_time_s(st.shape) for st in prompt
                       if t0 <= st.t and st.t + st.s <= t1))
    return out


def less_excess(records: Sequence[RequestRecord], excess: Sequence[float]) -> list[RequestRecord]:
    """The records as if their prompt steps had run at the model's speed: TTFT and end-to-end time less
    each one's :func:`prompt_step_excess` (the streamed chunks' spacing is left as it was)."""
    return [r if r.ttft_s is None else
            replace(r, ttft_s=r.ttft_s - e, e2e_s=None if r.e2e_s is None else r.e2e_s - e)
            for r, e in zip(records, excess, strict=True)]


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
