"""Predicted TTFT and ITL of a candidate shape under the observed load.

The per-request terms are the router's cost model
(:mod:`pdserve.router.cost_model`): ``prefill_s`` (queued prompt tokens plus
this prompt's, over the prefill rate), ``transfer_s`` (KV hand-off) and
``itl_s`` (a decode step at a batch, with KV pressure). What the planner adds
is the steady state a shape would settle in, from queueing:

* **Prefill.** Requests arrive at ``λ`` per second with prompt lengths ``L``
  (the window's sample, not its mean). Spread over ``n`` workers of rate
  ``r``, each is an M/G/1 queue with service ``S = L/r``; its mean wait is
  ``λ/n · E[S²] / (2(1-ρ))`` with ``ρ = λ E[L] / (n r)``, i.e. ``wait · r``
  queued tokens. Each sampled request's TTFT is then ``overhead +
  prefill_s(queued, L_i) + transfer_s(L_i)`` (no transfer when aggregated).
* **Decode.** A decode step at batch ``b`` takes ``s(b) = s0 + c·b``
  (fitted on the window: each request's mean ITL against the streams that
  decoded beside it). ``n`` decode workers carry ``Λ = λ E[O]`` tokens/s,
  so by Little's law ``b = Λ·itl/n`` and ``itl = s(b)``: ``itl = s0/(1-ρd)``
  with ``ρd = c Λ / n``. ``itl_s`` of the cost model gives the figure at
  that batch (with its KV-pressure factor).
* **Mixed workers** do both: the prefill share ``ρ`` of their time
  stretches every decode step (``itl / (1-ρ)``), and prefill runs at the
  rate decode leaves it.

* **Stalls** (with a gap SLO, ``max_gap_s``): a mixed worker runs a prompt in
  chunks inside the decode steps of the streams beside it, and a chunk of a
  long prompt can outlast the gap SLO by itself; the share of streams that
  meet such a chunk misses (:mod:`pdserve.planner.stalls`: the chunk step
  times fitted on the window's prefills, and the exposure). Split shapes do
  not stall: a decode worker runs no prompt chunk (``--disagg-policy
  always``; under ``auto`` it prefills only prompts cheaper there, i.e. short
  ones).

A request is within the SLOs when its TTFT is within ``ttft_slo_s`` (plus
``ttft_per_token_s`` × its prompt tokens: a length-aware TTFT SLO), the ITL
within ``itl_slo_s``, and it is not stalled. A shape meets the SLOs when the
share of sampled requests predicted within them (the predicted attainment)
reaches the target and no pool is past ``max_utilization``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.planner import stalls
from pdserve.planner.signals import Shape, Signals, percentile
from pdserve.planner.tpot import tpot_attainment
from pdserve.router import cost_model as cm

#: Speeds assumed before anything was measured (a one-thread tiny worker is far faster).
DEFAULT_PREFILL_TPS = 2000.0
DEFAULT_STEP_S = 0.02
#: The decode fit uses the most recent requests only (it is quadratic in them).
MAX_FIT_POINTS = 300
#: Weight of a window's decode fit against the speeds carried from the previous intervals.
DECODE_SMOOTHING = 0.3


@dataclass(frozen=True)
class Speeds:
    """Measured (or assumed) speeds of one worker.

    Attributes:
        prefill_tps: prompt tokens per second.
        step_s: decode step time at batch one (``s0 + c``).
        per_seq_s: what each more sequence adds to a step (``c``).
        overhead_s: TTFT spent outside the worker queue and the prefill (router, hops).
        measured: False when these are the defaults.
        prefill_per_pair_s: the attention term ``k`` of a prompt's prefill time
            ``t(L) = a·L + k·L²`` (0 when not measured).
        decode_measured: ``step_s`` and ``per_seq_s`` were fitted (later fits are smoothed into them).
        chunk_fit: a prompt chunk step's time (:mod:`pdserve.planner.stalls`; None: not fitted yet).
    """

    prefill_tps: float = DEFAULT_PREFILL_TPS
    step_s: float = DEFAULT_STEP_S
    per_seq_s: float = DEFAULT_STEP_S / 4
    overhead_s: float = 0.0
    measured: bool = False
    prefill_per_pair_s: float = 0.0
    decode_measured: bool = False
    chunk_fit: stalls.ChunkFit | None = None


@dataclass(frozen=True)
class Prediction:
    """What one shape is predicted to give the observed load."""

    shape: Shape
    ttft_p90_s: float  # inf when a pool is saturated
    itl_s: float
    attainment: float  # predicted share of requests within both SLOs
    utilization: float  # the busiest pool's
    meets: bool
    itl_attainment: float = 1.0  # predicted share of requests whose own TPOT is within the SLO

    def as_dict(self) -> dict[str, object]:
        """JSON-ready (infinities as None)."""
        return {
            "shape": str(self.shape),
            "ttft_p90_s": _finite(self.ttft_p90_s),
            "itl_s": _finite(self.itl_s),
            "attainment": round(self.attainment, 4),
            "utilization": _finite(self.utilization),
            "itl_attainment": round(self.itl_attainment, 4),
            "meets": self.meets,
        }


def _finite(x: float) -> float | None:
    return round(x, 6) if math.isfinite(x) else None


def measure_speeds(
    sig: Signals, previous: Speeds | None = None, smoothing: float = DECODE_SMOOTHING, chunk_tokens: int = 512
) -> Speeds:
    """Speeds from the window (the previous ones, or the defaults, for what it cannot tell); a new
    decode or chunk fit counts ``smoothing`` against the previous one (``chunk_tokens``: the
    workers' chunk size, for the chunk fit)."""
    base = previous or Speeds()
    # the window's timed prefills (prompt tokens, seconds), the most recent last
    timed = [(r.prompt_tokens, r.prefill_s) for r in sig.requests if r.prefill_s and r.prompt_tokens > 0]
    rates = [n / t for n, t in timed]
    prefill = sig.prefill_rate_tps or (sorted(rates)[len(rates) // 2] if rates else None) or base.prefill_tps
    overheads = [r.overhead_s for r in sig.requests]
    overhead = sorted(overheads)[len(overheads) // 2] if overheads else base.overhead_s
    fit_decode = _fit_decode(sig)
    step, per_seq = fit_decode or (base.step_s, base.per_seq_s)
    if fit_decode is not None and previous is not None and previous.decode_measured:
        # the decode fit is a slope over a window's few dozen requests: it swings from one window
        # to the next (S7 simulated: 1-11 ms per sequence on one chat load), and a slope is a
        # property of the hardware, not of the load: smooth it
        def smooth(new: float, old: float) -> float:
            return smoothing * new + (1 - smoothing) * old

        step, per_seq = smooth(step, previous.step_s), smooth(per_seq, previous.per_seq_s)
    measured = base.measured or bool(rates) or sig.prefill_rate_tps is not None
    # A window whose short prompts were batched with long ones can fit no slope (k = 0); a pair's
    # cost does not change with the load, so the last slope measured stands until a new one is.
    fit = _fit_prefill(timed[-MAX_FIT_POINTS:])
    per_pair = fit[1] if fit is not None and fit[1] > 0 else base.prefill_per_pair_s
    decode_measured = base.decode_measured or fit_decode is not None
    chunk_fit = stalls.fit_chunks(timed[-MAX_FIT_POINTS:], chunk_tokens)
    if chunk_fit is not None and base.chunk_fit is not None:
        chunk_fit = chunk_fit.blend(base.chunk_fit, smoothing)
    return Speeds(prefill, step, per_seq, overhead, measured, per_pair, decode_measured,
                  chunk_fit or base.chunk_fit)


def _fit_prefill(timed: Sequence[tuple[int, float]]) -> tuple[float, float] | None:
    """Least squares ``t(L)/L = a + k·L`` over timed prefills ``(L, t)`` (None: too few, one length)."""
    points = [(n, t / n) for n, t in timed]
    if len(points) < 3:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    var = sum((x - mx) ** 2 for x, _ in points)
    if var < 1.0:
        return None
    k = max(sum((x - mx) * (y - my) for x, y in points) / var, 0.0)
    a = max(my - k * mx, my * 0.1)
    return a, k


def _fit_decode(sig: Signals) -> tuple[float, float] | None:
    """Least squares ``itl = s0 + c·b`` over the window (b: streams decoding beside it, per decoder)."""
    spans = [
        (r.arrived_s + (r.ttft_s or 0.0), r.arrived_s + (r.e2e_s or 0.0), r.itl_s)
        for r in sig.requests
        if r.itl_s is not None and r.e2e_s is not None
    ][-MAX_FIT_POINTS:]
    decoders = max(sig.actual.decode + sig.actual.mixed, 1)
    points: list[tuple[float, float]] = []
    for start, end, itl in spans:
        mid = (start + end) / 2
        beside = sum(1 for s, e, _ in spans if s <= mid <= e)
        points.append((max(beside / decoders, 1.0), float(itl or 0.0)))
    if len(points) < 3:
        return None
    mb = sum(b for b, _ in points) / len(points)
    mi = sum(i for _, i in points) / len(points)
    var = sum((b - mb) ** 2 for b, _ in points)
    c = sum((b - mb) * (i - mi) for b, i in points) / var if var > 1e-9 else 0.0
    c = max(c, 0.0)
    s0 = max(mi - c * mb, mi * 0.1, 1e-4)
    return s0 + c, c


def _wait_tokens(lam: float, lengths: Sequence[int], rate: float) -> tuple[float, float]:
    """(mean queued prompt tokens, utilization) of one M/G/1 prefill queue."""
    if lam <= 0 or not lengths:
        return 0.0, 0.0
    mean_s = sum(lengths) / len(lengths) / rate
    second = sum((n / rate) ** 2 for n in lengths) / len(lengths)
    rho = lam * mean_s
    if rho >= 1:
        return math.inf, rho
    return lam * second / (2 * (1 - rho)) * rate, rho


def _itl(tokens_per_s: float, n: int, speeds: Speeds, stretch: float, kv_usage: float) -> tuple[float, float]:
    """(ITL, decode utilization) of ``n`` decoders carrying ``tokens_per_s``; ``stretch`` ≥ 1."""
    rho = speeds.per_seq_s * tokens_per_s / n * stretch
    if rho >= 1:
        return math.inf, rho
    s0 = max(speeds.step_s - speeds.per_seq_s, 1e-6)
    itl = s0 * stretch / (1 - rho)
    batch = max(tokens_per_s / n * itl, 1.0)
    snap = cm.WorkerSnapshot(
        "planned",
        "decode",
        num_running=max(round(batch) - 1, 0),
        kv_usage=kv_usage,
        decode_step_s=itl,
        decode_batch=float(max(round(batch), 1)),
    )
    return cm.itl_s(snap, cm.CostParams()), rho


def _mixed_prefill(
    n: int, lam: float, lengths: Sequence[int], tokens_per_s: float, speeds: Speeds
) -> tuple[float, float, float]:
    """(queued prompt tokens, prefill rate, decode stretch ``1/(1-ρ)``) of ``n`` mixed workers."""
    decode_share = min(speeds.per_seq_s * tokens_per_s / n, 0.95)
    rate = speeds.prefill_tps * (1 - decode_share)
    queued, rho_p = _wait_tokens(lam / n, lengths, rate)
    return queued, rate, 1 / (1 - rho_p) if rho_p < 1 else math.inf


def _fitted_stretch(sig: Signals, speeds: Speeds) -> float:
    """The prefill stretch already inside the decode fit: the window's ITLs were measured on the
    deployment it ran on (:attr:`Signals.actual`), and on mixed workers they include their
    prompt chunks (1 on a split deployment)."""
    shape = sig.actual
    if shape.mixed == 0 or shape.prefill or shape.decode:
        return 1.0
    outputs = sig.output_lengths or [0]
    tokens_per_s = sig.arrival_rate * sum(outputs) / len(outputs)
    lengths = sig.prompt_lengths or [0]
    stretch = _mixed_prefill(shape.mixed, sig.arrival_rate, lengths, tokens_per_s, speeds)[2]
    return stretch if math.isfinite(stretch) else 1.0


def stall_share(
    lam: float,
    lengths: Sequence[int],
    speeds: Speeds,
    gap_s: float,
    chunk_tokens: int,
    decode_part_s: float,
    decode_s: float,
) -> float:
    """Share of a mixed worker's streams stalled past ``gap_s`` by a prompt chunk, with ``speeds``
    (:func:`pdserve.planner.stalls.stall_share`: ``lam`` requests/s reach the worker, ``lengths``
    sample their prompts, the decode tokens batched with a chunk add ``decode_part_s`` to its step
    when the chunk time is not fitted, and a stream decodes for ``decode_s`` seconds)."""
    return stalls.stall_share(lam, lengths, speeds.prefill_tps, speeds.prefill_per_pair_s, gap_s,
                              chunk_tokens, decode_part_s, decode_s, speeds.chunk_fit)


def predict(
    shape: Shape,
    sig: Signals,
    speeds: Speeds,
    ttft_slo_s: float,
    itl_slo_s: float,
    *,
    attainment_target: float = 0.9,
    max_utilization: float = 0.9,
    margin: float = 0.0,
    load_factor: float = 1.0,
    ttft_per_token_s: float = 0.0,
    max_gap_s: float | None = None,
    chunk_tokens: int = 512,
) -> Prediction:
    """Predict ``shape`` under the window's load (× ``load_factor``); SLOs tightened by ``margin``;
    ``ttft_per_token_s``, ``max_gap_s`` and ``chunk_tokens``: see the module docstring."""
    lam = sig.arrival_rate * load_factor
    lengths = sig.prompt_lengths or [0]
    outputs = sig.output_lengths or [0]
    tokens_per_s = lam * sum(outputs) / len(outputs)
    kv = max((w.kv_usage for w in sig.workers), default=0.0)
    fitted = _fitted_stretch(sig, speeds)  # the prompt chunks' stretch already in the decode fit
    params = cm.CostParams()
    if shape.mixed > 0 and shape.prefill == shape.decode == 0:  # aggregated
        n = shape.mixed
        queued, rate, stretch = _mixed_prefill(n, lam, lengths, tokens_per_s, speeds)
        rho_p = 1 - 1 / stretch if math.isfinite(stretch) else 1.0
        decode_stretch = stretch / fitted
        itl, rho_d = (
            _itl(tokens_per_s, n, speeds, decode_stretch, kv) if math.isfinite(stretch) else (math.inf, 1.0)
        )
        transfer = 0.0
        stalled = (
            stall_share(
                lam / n,
                lengths,
                speeds,
                max_gap_s * (1 - margin),
                chunk_tokens,
                speeds.per_seq_s * max(tokens_per_s / n * itl, 1.0),
                itl * sum(outputs) / len(outputs),
            )
            if max_gap_s is not None and math.isfinite(itl)
            else 0.0
        )
        decode_lam = lam / n
    else:
        stalled = 0.0
        queued, rho_p = _wait_tokens(lam / max(shape.prefill, 1), lengths, speeds.prefill_tps)
        rate = speeds.prefill_tps
        # The fit measured on mixed workers includes their prompt chunks, which a decode worker
        # would not run; that speed-up is not credited (unmeasured: S7 measured 1P+1D's decode
        # worker slower on chat than 2M's, TPOT p90 57 vs 43 ms)
        decode_stretch = 1.0
        itl, rho_d = _itl(tokens_per_s, max(shape.decode, 1), speeds, decode_stretch, kv)
        transfer = -1.0  # per request, below
        decode_lam = lam / max(shape.decode, 1)
    ttfts: list[float] = []
    for n_tokens in lengths:
        if not math.isfinite(queued):
            ttfts.append(math.inf)
            continue
        snap = cm.WorkerSnapshot(
            "planned", "prefill", queued_prefill_tokens=round(queued), prefill_rate_tps=rate
        )
        t = speeds.overhead_s + cm.prefill_s(snap, n_tokens, params)
        if transfer < 0:
            t += cm.transfer_s(n_tokens, None, params)
        ttfts.append(t)
    ttft_ok = ttft_slo_s * (1 - margin)
    itl_ok = itl_slo_s * (1 - margin)
    per_token_ok = ttft_per_token_s * (1 - margin)
    within = (
        sum(1 for t, n in zip(ttfts, lengths, strict=True) if t <= ttft_ok + per_token_ok * n)
        if max_gap_s is None or itl <= max_gap_s * (1 - margin)
        else 0
    )
    # each request's own TPOT, from the batch it decodes in (pdserve.planner.tpot), not the mean
    base = max(speeds.step_s - speeds.per_seq_s, 1e-6)
    itl_share = tpot_attainment(
        decode_lam, sig.output_lengths, base, speeds.per_seq_s, itl_ok, decode_stretch
    )
    attainment = within / len(ttfts) * itl_share * (1.0 - stalled)
    utilization = max(rho_p, rho_d)
    p90 = percentile(ttfts, 0.9)
    return Prediction(
        shape=shape,
        ttft_p90_s=math.inf if p90 is None else p90,
        itl_s=itl,
        attainment=attainment,
        utilization=utilization,
        meets=attainment >= attainment_target and utilization <= max_utilization,
        itl_attainment=itl_share,
    )
