"""The planner's decision: from a signal snapshot to the target shape (pure).

:func:`decide` is called once per interval with the latest
:class:`~pdserve.planner.signals.Signals`, the planner's own
:class:`PlannerState` (updated in place) and its :class:`PlannerConfig`. It

1. waits while a previous decision is being carried out, and gives it up
   (action ``give_up``, the slots that did not become ready reported, the
   target set back to what is ready) once ``ready_timeout_s`` passed;
2. predicts every candidate shape within the budget
   (:func:`~pdserve.planner.predict.predict`): all-mixed (aggregated) with
   1..N workers, and every P+D split of 2..N workers; with a core budget and
   a measured :class:`~pdserve.planner.thread_scaling.ThreadScaling`, at every
   thread count per worker that fits (``1M×2t``, ``2M×1t``, ``1P+1D×1t`` on
   two cores), each predicted with the speeds measured at the thread count in
   place scaled by the table;
3. picks the cheapest shape meeting both SLOs (fewest cores; among equals
   the current shape, then aggregated, then the best predicted attainment to
   the point, then the most headroom: the lowest of predicted TTFT p90 and ITL
   over their SLOs),
   or, when none does, the most attaining one at the budget (``over_capacity``:
   the router sheds early then);
4. acts at once when that needs more workers, or when the current shape is
   predicted to miss the SLOs — a same-size reshape only when what was measured
   at this load does not contradict the model (:mod:`~pdserve.planner.measured`:
   the shape in place measuring the attainment target, or the shape to go to
   having measured no better than it); a smaller shape is taken only while the
   current one *measures* its attainment target (ended requests, and those in
   flight already past the TTFT SLO), when it meets
   the SLOs with ``down_margin`` for ``down_intervals`` intervals in a row
   *and* passes the N−1 absorb check (it still meets them, without margin,
   at the peak arrival rate of the recent intervals × ``absorb_headroom``).

The target is always one complete shape (all three pools in one
``POST /pdserve/scale``), within the budget and never below ``min_workers``.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from pdserve.planner.candidates import at_threads, candidates
from pdserve.planner.decision import Decision
from pdserve.planner.inputs import decision_inputs
from pdserve.planner.measured import MeasuredRecord, measured_miss, measured_veto, observe, revisit_veto
from pdserve.planner.predict import DECODE_SMOOTHING, Prediction, Speeds, measure_speeds, predict
from pdserve.planner.signals import MIN_ONSET, Shape, Signals
from pdserve.planner.thread_scaling import ThreadScaling

HOLD, SCALE_UP, SCALE_DOWN, RESHAPE, WAIT, GIVE_UP = (
    "hold",
    "scale_up",
    "scale_down",
    "reshape",
    "wait",
    "give_up",
)
ACTIONS = (HOLD, SCALE_UP, SCALE_DOWN, RESHAPE, WAIT, GIVE_UP)


@dataclass(frozen=True)
class PlannerConfig:
    """The SLOs, the budget and the safeguards' knobs.

    Attributes:
        ttft_slo_s, itl_slo_s: the SLOs (TTFT; mean gap between a request's tokens).
        max_workers: the budget (``--max-workers``, or ``--max-cores`` / threads per worker).
        max_cores: a core budget within which the planner also chooses each worker's threads
            (workers × threads ≤ this; None: the threads stay as the workers were started).
        thread_scaling: the speeds per thread count measured on this machine; with ``max_cores``
            its counts up to ``max_cores`` are the thread counts the planner may choose.
        min_workers: the floor (zero traffic goes here).
        attainment_target: share of requests that must be predicted within both SLOs.
        max_utilization: no pool planned busier than this.
        down_margin: a smaller shape must meet SLOs tightened by this share...
        down_intervals: ...this many intervals in a row.
        absorb_headroom: the N−1 check's load: the recent peak arrival rate × this.
        peak_intervals: how many intervals the peak is taken over.
        ready_timeout_s: a decision not carried out by then is given up.
        revisit_s: a shape left (measuring attainment ``a``) is not gone back to by a reshape or a
            scale-down for this long, at a similar arrival rate (±25 %), unless the current shape
            measures below ``a`` (scale-ups are never held back).
        allow_aggregated, allow_disaggregated: which shapes are candidates.
        ttft_per_token_s: a length-aware TTFT SLO: a request may take ``ttft_slo_s`` + this ×
            its prompt tokens (0: a flat TTFT SLO).
        max_gap_s: a stall SLO: the longest gap between two tokens of a request (None: not judged);
            a mixed worker's prompt chunks stretch the decode steps beside them
            (:func:`~pdserve.planner.predict.stall_share`).
        chunk_tokens: the workers' ``--chunk-size`` (prompt tokens per step), for ``max_gap_s``.
        over_capacity_gain: when no shape meets the SLOs, a shape of no more workers is moved to
            only when predicted to attain this much more than the current one (S7 simulated,
            classic load: 2M → 1P+1D → 2M in 20 s on predictions of 11.11 % vs 11.11 %).
        decode_smoothing: weight of a window's decode fit against the speeds carried over.
        min_onset: fewest arrivals in a window to read a load that started inside it at its rate.
        load_tolerance: the measured record (:mod:`~pdserve.planner.measured`) is cleared when the
            arrival rate or the mean prompt length moves past ``1 +`` this times its reference.
        record_intervals: intervals of measurement kept per shape.
        prediction_drift: the record of the shape in place is set aside when the model's
            attainment for it moves further than this from its mean over the record.
    """

    ttft_slo_s: float
    itl_slo_s: float
    max_workers: int = 2
    min_workers: int = 1
    attainment_target: float = 0.9
    max_utilization: float = 0.9
    down_margin: float = 0.2
    down_intervals: int = 3
    absorb_headroom: float = 1.1
    peak_intervals: int = 6
    ready_timeout_s: float = 120.0
    revisit_s: float = 300.0
    allow_aggregated: bool = True
    allow_disaggregated: bool = True
    ttft_per_token_s: float = 0.0
    max_gap_s: float | None = None
    chunk_tokens: int = 512
    over_capacity_gain: float = 0.05
    decode_smoothing: float = DECODE_SMOOTHING
    min_onset: int = MIN_ONSET
    load_tolerance: float = 1.0
    record_intervals: int = 12
    prediction_drift: float = 0.2
    max_cores: int | None = None
    thread_scaling: ThreadScaling | None = None

    @property
    def thread_options(self) -> tuple[int, ...]:
        """The threads per worker the planner chooses from (empty: it does not choose them)."""
        if self.max_cores is None or self.thread_scaling is None:
            return ()
        return tuple(t for t in self.thread_scaling.threads if t <= self.max_cores)

    def __post_init__(self) -> None:
        if self.ttft_slo_s <= 0 or self.itl_slo_s <= 0:
            raise ValueError("the TTFT and ITL SLOs must be > 0")
        if self.ttft_per_token_s < 0 or (self.max_gap_s is not None and self.max_gap_s <= 0):
            raise ValueError("the per-token TTFT must be ≥ 0 and the gap SLO > 0")
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be ≥ 1, got {self.chunk_tokens}")
        if not 1 <= self.min_workers <= self.max_workers:
            raise ValueError(
                f"need 1 <= min_workers ({self.min_workers}) <= max_workers ({self.max_workers})"
            )
        if not 0 < self.decode_smoothing <= 1 or self.min_onset < 2 or self.over_capacity_gain < 0:
            raise ValueError("need 0 < decode_smoothing <= 1, min_onset >= 2, over_capacity_gain >= 0")
        if self.load_tolerance <= 0 or self.record_intervals < 1 or self.prediction_drift <= 0:
            raise ValueError("need load_tolerance > 0, record_intervals >= 1 and prediction_drift > 0")
        if self.max_cores is not None and self.max_cores < self.min_workers:
            raise ValueError(f"max_cores ({self.max_cores}) is below min_workers ({self.min_workers})")
        if not (self.allow_aggregated or (self.allow_disaggregated and self.max_workers >= 2)):
            raise ValueError("no candidate shape: allow aggregated shapes or a budget of 2+ workers")


@dataclass
class PlannerState:
    """What the planner carries from one interval to the next."""

    speeds: Speeds | None = None
    down_streak: int = 0
    down_candidate: Shape | None = None
    pending: Shape | None = None  # a target set, not reached yet
    pending_since_s: float = 0.0
    arrivals: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=64))
    #: shapes left: when, their measured attainment then, the arrival rate then
    left: dict[Shape, tuple[float, float, float]] = field(default_factory=dict)
    #: what each shape measured while in place, at the load of now
    record: MeasuredRecord = field(default_factory=MeasuredRecord)
    #: the shape in place (targets reached, nothing starting) and since when
    in_place: tuple[Shape, float] | None = None
    #: the threads per worker ``speeds`` were measured at (0: not known)
    speeds_threads: int = 0


def decide(sig: Signals, state: PlannerState, cfg: PlannerConfig) -> Decision:
    """One interval's decision (see the module docstring); updates ``state``."""
    now = sig.taken_s
    if sig.min_onset != cfg.min_onset:
        sig = dataclasses.replace(sig, min_onset=cfg.min_onset)
    sig = at_threads(sig, cfg)
    threads_now, table = sig.actual.threads, cfg.thread_scaling
    if table is not None and state.speeds is not None:
        # the workers' threads changed: what was carried over is re-based on the new count
        state.speeds = table.scale(state.speeds, state.speeds_threads, threads_now)
    state.speeds = speeds = measure_speeds(sig, state.speeds, cfg.decode_smoothing, cfg.chunk_tokens)
    state.speeds_threads = threads_now or state.speeds_threads
    state.arrivals.append(sig.arrival_rate)
    inputs = decision_inputs(sig, speeds, cfg.ttft_slo_s, cfg.itl_slo_s, cfg.ttft_per_token_s, cfg.max_gap_s)
    current = sig.targets
    _observe(state, sig, cfg, inputs)

    def make(
        action: str,
        target: Shape,
        reason: str,
        chosen: Prediction | None = None,
        cands: tuple[Prediction, ...] = (),
        over: bool = False,
        gave_up: tuple[str, ...] = (),
    ) -> Decision:
        return Decision(now, action, current, target, reason, inputs, chosen, cands, over, gave_up)

    if state.pending is not None:
        if sig.actual == state.pending and not sig.starting:
            state.pending = None
        elif now - state.pending_since_s > cfg.ready_timeout_s:
            stuck = tuple(sorted({*sig.starting, *sig.failed}))
            state.pending = None
            state.down_streak = 0
            back = sig.actual if sig.actual.servable else current
            return make(
                GIVE_UP,
                back,
                f"{current} not ready after {cfg.ready_timeout_s:.0f} s; "
                f"keeping {back} (not ready: {', '.join(stuck) or 'none'})",
                gave_up=stuck,
            )
        else:
            return make(WAIT, current, f"waiting for {state.pending} (ready: {sig.actual})")

    def run(shape: Shape, **kw: Any) -> Prediction:
        return predict(
            shape,
            sig,
            speeds if table is None else table.scale(speeds, state.speeds_threads, shape.threads),
            cfg.ttft_slo_s,
            cfg.itl_slo_s,
            attainment_target=cfg.attainment_target,
            max_utilization=cfg.max_utilization,
            ttft_per_token_s=cfg.ttft_per_token_s,
            max_gap_s=cfg.max_gap_s,
            chunk_tokens=cfg.chunk_tokens,
            **kw,
        )

    preds = [run(s) for s in candidates(cfg)]
    now_pred = run(current) if current.servable else None
    if now_pred is not None:
        state.record.note_prediction(current, now, now_pred.attainment)
    contradicted = measured_miss(state.record, now_pred, cfg.attainment_target)
    if contradicted is not None:  # the shape in place is judged by what it measured here
        preds = [contradicted if p.shape == current else p for p in preds]
        now_pred = contradicted
    meeting = [p for p in preds if p.meets]

    def rank(p: Prediction) -> tuple[int, int, int, float, float]:
        # Among shapes of equal cost and kind, attainment counts to the point (a window's few dozen
        # requests tell no finer), then the most headroom. S3: 2M×1t (100 %, TTFT p90 805 ms of
        # 883) was taken over 1M×2t (99.99 %, 467 ms), and missed 16 s later.
        headroom = max(p.ttft_p90_s / cfg.ttft_slo_s, p.itl_s / cfg.itl_slo_s)
        return (p.shape.cores, p.shape != current, p.shape.mixed == 0, -round(p.attainment, 2), headroom)

    over = not meeting
    if meeting:
        best = min(meeting, key=rank)
    else:
        top = [p for p in preds if p.shape.cores == max(q.shape.cores for q in preds)]
        best = max(top, key=lambda p: (p.attainment, -p.utilization, p.shape == current))
    shown = tuple(sorted(preds, key=rank)[:6])
    current_meets = now_pred is not None and now_pred.meets

    if best.shape == current:
        state.down_streak = 0
        return make(
            HOLD,
            current,
            "current shape is the best" + (" (over capacity)" if over else ""),
            best,
            shown,
            over,
        )
    if best.shape.cores > current.cores or not current_meets:
        if (
            over
            and now_pred is not None
            and now_pred.attainment + cfg.over_capacity_gain > best.attainment
            and best.shape.cores <= current.cores
        ):
            state.down_streak = 0
            return make(
                HOLD, current, "over capacity: no shape in the budget does better "
                f"by {cfg.over_capacity_gain:.0%} or more", now_pred, shown, over
            )
        state.down_streak = 0
        action = SCALE_UP if best.shape.cores > current.cores else RESHAPE
        veto = _revisit_veto(state, sig, cfg, best.shape) if action == RESHAPE else None
        if veto is None and action == RESHAPE and now_pred is not None:
            veto = measured_veto(state.record, now_pred, best, over_capacity=over,
                                 target=cfg.attainment_target, gain=cfg.over_capacity_gain)
        if veto is not None:
            return make(HOLD, current, f"no reshape: {veto}", now_pred, shown, over)
        why = "predicted to miss the SLOs" if not current_meets else "needs more capacity"
        if contradicted is not None:
            why = f"measures {contradicted.attainment:.0%} at this load (predicted to meet the SLOs)"
        return _act(
            state,
            make(
                action,
                best.shape,
                f"{current} {why}; {best.shape} meets them"
                if not over
                else f"{current} {why}; {best.shape} attains most",
                best,
                shown,
                over,
            ),
        )
    if best.shape.cores == current.cores:
        state.down_streak = 0
        return make(HOLD, current, f"{current} meets the SLOs; {best.shape} costs the same", now_pred, shown)
    # Smaller: never while the current shape measures misses, then hysteresis, then the N-1 check.
    measured = sig.attainment(cfg.ttft_slo_s, cfg.itl_slo_s, cfg.ttft_per_token_s, cfg.max_gap_s)
    if measured is not None and measured < cfg.attainment_target:
        state.down_streak = 0
        return make(HOLD, current, f"{best.shape} is predicted to meet the SLOs, but {current} measures "
                    f"{measured:.0%} attainment: no removal while it misses them", now_pred, shown)
    veto = _revisit_veto(state, sig, cfg, best.shape)
    if veto is not None:
        state.down_streak = 0
        return make(HOLD, current, f"no scale-down: {veto}", now_pred, shown)
    with_margin = run(best.shape, margin=cfg.down_margin)
    # the recent peak, and what the window's count allows the rate to be: the windows of a few
    # intervals overlap, so a lull read in one is read in all of them (S7 simulated, classic
    # load: 0.67-0.8 req/s read for 60 s of a 1 req/s stream; 1M taken, and left 20 s later)
    peak = max([*list(state.arrivals)[-cfg.peak_intervals :], sig.arrival_rate, sig.arrival_rate_bound()])
    factor = cfg.absorb_headroom * (peak / sig.arrival_rate if sig.arrival_rate > 0 else 1.0)
    absorbs = run(best.shape, load_factor=factor)
    if not with_margin.meets or not absorbs.meets:
        state.down_streak = 0
        why = "not with margin" if not with_margin.meets else f"absorb check fails at {factor:.2f}x load"
        return make(HOLD, current, f"{best.shape} would meet the SLOs but {why}", now_pred, shown)
    state.down_streak = state.down_streak + 1 if state.down_candidate == best.shape else 1
    state.down_candidate = best.shape
    if state.down_streak < cfg.down_intervals:
        return make(
            HOLD,
            current,
            f"{best.shape} meets the SLOs with margin ({state.down_streak}/{cfg.down_intervals} intervals)",
            now_pred,
            shown,
        )
    state.down_streak = 0
    return _act(
        state,
        make(
            SCALE_DOWN,
            best.shape,
            f"{best.shape} met the SLOs with margin for "
            f"{cfg.down_intervals} intervals and absorbs {factor:.2f}x load",
            best,
            shown,
        ),
    )


def _observe(state: PlannerState, sig: Signals, cfg: PlannerConfig, inputs: dict[str, Any]) -> None:
    """Feed the measured record (the shape in place for a whole window, and the load)."""
    record = state.record
    record.tolerance, record.max_age_s, record.drift = cfg.load_tolerance, cfg.revisit_s, cfg.prediction_drift
    if record.max_observations != cfg.record_intervals:
        record.max_observations = cfg.record_intervals
        record.shapes.clear()
    state.in_place = observe(record, state.in_place, sig, state.pending, inputs)


def _act(state: PlannerState, d: Decision) -> Decision:
    state.pending = d.target
    state.pending_since_s = d.at_s
    measured = d.inputs.get("attainment")
    if measured is not None and d.changes:
        state.left[d.current] = (d.at_s, float(measured), float(d.inputs.get("arrival_rate") or 0.0))
    return d


def _revisit_veto(state: PlannerState, sig: Signals, cfg: PlannerConfig, shape: Shape) -> str | None:
    """:func:`~pdserve.planner.measured.revisit_veto` with the window's measured attainment."""
    measured = sig.attainment(cfg.ttft_slo_s, cfg.itl_slo_s, cfg.ttft_per_token_s, cfg.max_gap_s)
    return revisit_veto(state.left, sig, shape, cfg.revisit_s, measured)


def finite_or_none(x: float | None) -> float | None:
    """``x`` unless it is None, inf or NaN."""
    return x if x is not None and math.isfinite(x) else None
