"""What each shape *measured* while it was in place, at the load of now (the planner's memory).

The planner's model ranks shapes it is not in; the shape in place is also
measured. The S7 surge (benchmarks/results/s7_planner_surge.json, document
phase) showed the model pessimistic about the shape in place: 2 mixed workers
measured 100 % SLO attainment for the seven intervals before the planner left
them because the model predicted 83 %; 1P+1D (predicted 94 %) then measured
69 % and 40 %, and the planner flapped 2M ↔ 1P+1D four times in 40 s. This
memory lets :func:`~pdserve.planner.planner.decide` judge a shape it has been
in by what it measured there.

Kept small, deterministic and bounded:

* an **observation** is one interval's measured attainment (the window's
  share of requests within the SLOs) and request count, taken only while the
  shape has been in place (targets reached, nothing starting) for a whole
  window, so no request served by the shape before it counts;
* each shape keeps its last ``max_observations``; observations older than
  ``max_age_s`` are dropped;
* the memory is **cleared** when the load moves: when the window's arrival
  rate or mean prompt length is more than ``1 + tolerance`` times the
  memory's reference (the mean over the observations held), or less than it
  divided by that — and the interval of the change records nothing (its
  window straddles the change). A shape measured under another load is not
  evidence. The default (1: the rate or the prompt mean doubles or halves)
  is wide because one steady load's windows swing: in the S7 surge's
  document phase the 30 s windows read mean prompts of 300–1,036 tokens and
  0.3–0.69 req/s.

:func:`measured_veto` is the rule :func:`~pdserve.planner.planner.decide`
applies to a reshape that adds no worker (scale-ups are never held back).
"""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pdserve.planner.predict import Prediction
from pdserve.planner.signals import Shape, Signals


@dataclass(frozen=True)
class Observation:
    """One interval's measurement of the shape in place."""

    at_s: float
    attainment: float
    requests: int
    rate: float  # arrivals/s of the window
    prompt_mean: float  # mean prompt tokens of the window
    predicted: float | None = None  # the model's attainment for the shape in place then


@dataclass
class MeasuredRecord:
    """Per-shape measured attainment at the current load (see the module docstring).

    Attributes:
        tolerance: the load moved when the arrival rate or the mean prompt length is more than
            ``1 + tolerance`` times the reference or less than the reference over that (then the
            memory is cleared).
        max_age_s: observations older than this are dropped.
        max_observations: per shape, only the most recent are kept.
        min_requests: a shape's record counts only with at least this many requests (summed over
            its observations; the windows overlap, so a request may count more than once).
        drift: the record of the shape in place is not used when the model's attainment for it now
            is further than this from what the model predicted over the record (:func:`measured_veto`).
    """

    tolerance: float = 1.0
    max_age_s: float = 300.0
    max_observations: int = 12
    min_requests: int = 10
    drift: float = 0.2
    shapes: dict[Shape, collections.deque[Observation]] = field(default_factory=dict)
    cleared_at_s: float | None = None

    def reference(self) -> tuple[float, float] | None:
        """The mean arrival rate and prompt length over the observations held (None: empty)."""
        obs = [o for q in self.shapes.values() for o in q]
        if not obs:
            return None
        return sum(o.rate for o in obs) / len(obs), sum(o.prompt_mean for o in obs) / len(obs)

    def moved(self, rate: float, prompt_mean: float) -> bool:
        """The load ``(rate, prompt_mean)`` is past ``1 + tolerance`` times the reference, or below
        the reference over that (zero traffic after some: moved)."""
        ref = self.reference()
        if ref is None:
            return False
        f = 1 + self.tolerance
        return any(x > r * f or x < r / f for x, r in zip((rate, prompt_mean), ref, strict=True))

    def update(
        self,
        now_s: float,
        rate: float,
        prompt_mean: float,
        shape: Shape | None = None,
        attainment: float | None = None,
        requests: int = 0,
    ) -> bool:
        """One interval: expire what is old or of another load, then record ``shape``'s measurement
        (``shape`` None: none in place for a whole window). Returns True when the load moved."""
        for s in list(self.shapes):
            q = self.shapes[s]
            while q and now_s - q[0].at_s > self.max_age_s:
                q.popleft()
            if not q:
                del self.shapes[s]
        if self.moved(rate, prompt_mean):
            self.shapes.clear()
            self.cleared_at_s = now_s
            return True
        if shape is not None and attainment is not None and requests > 0:
            q = self.shapes.setdefault(shape, collections.deque(maxlen=self.max_observations))
            q.append(Observation(now_s, attainment, requests, rate, prompt_mean))
        return False

    def note_prediction(self, shape: Shape, now_s: float, predicted: float) -> None:
        """The model's attainment for ``shape`` at this interval's observation (if one was made)."""
        q = self.shapes.get(shape)
        if q and q[-1].at_s == now_s:
            q[-1] = dataclasses.replace(q[-1], predicted=predicted)

    def predicted(self, shape: Shape) -> float | None:
        """The model's mean attainment for ``shape`` over its observations (None: none noted)."""
        values = [o.predicted for o in self.shapes.get(shape, ()) if o.predicted is not None]
        return sum(values) / len(values) if values else None

    def attainment(self, shape: Shape) -> float | None:
        """``shape``'s measured attainment at this load, pooled over its observations (weighted by
        their requests); None without ``min_requests`` measured."""
        q = self.shapes.get(shape)
        total = sum(o.requests for o in q) if q else 0
        if not q or total < self.min_requests:
            return None
        return sum(o.attainment * o.requests for o in q) / total

    def describe(self) -> dict[str, float]:
        """Each shape's pooled attainment (for the decision's inputs)."""
        out = {}
        for s in self.shapes:
            a = self.attainment(s)
            if a is not None:
                out[str(s)] = round(a, 4)
        return out


def measured_miss(record: MeasuredRecord, current: Prediction | None, target: float) -> Prediction | None:
    """The prediction of the shape in place replaced by what it measured, when the model says it
    meets the SLOs and its record at this load says it does not (None otherwise).

    The other half of :func:`measured_veto`: there the record overrules a predicted miss, here a
    predicted success. S7 surge, document phase (22:30): 1M×2t predicted at 91-99 % in every
    window while it measured 29-69 % in five of them, and the planner held it through the phase
    (78 % against 1P+1D's 100 % as a static shape). Not used when the model's attainment for it
    now is more than ``drift`` away from its mean over the record (the load changed), nor on one
    interval's window alone (a burst of long prompts reads low in one window and passes).
    """
    if current is None or not current.meets or len(record.shapes.get(current.shape, ())) < 2:
        return None
    measured = record.attainment(current.shape)
    before = record.predicted(current.shape)
    if measured is None or measured >= target or (before is not None and abs(current.attainment - before)
                                                 > record.drift):
        return None
    return dataclasses.replace(current, attainment=measured, meets=False)


def measured_veto(
    record: MeasuredRecord,
    current: Prediction,
    best: Prediction,
    *,
    over_capacity: bool,
    target: float,
    gain: float,
) -> str | None:
    """Why moving from ``current`` to ``best`` (no more workers) is not supported by what was
    measured at this load (None: it is, or nothing was measured).

    Nothing is vetoed when the model's attainment for ``current`` now is more than ``drift`` away
    from what it predicted over ``current``'s record: the model sees a change of load the record's
    tolerance does not (simulated surge at 1.0 req/s: 10 s into the documents the model put 2M
    at 61 % after ~100 % through the chat phase; the record, 100 % in chat, held 2M 20 s longer).
    Else:

    * ``current`` *measures* ``target`` or better: the model's "it misses" is contradicted;
    * else, with a record of either shape, a shape is scored by its measured attainment (the one
      in place) or by the lower of its prediction and its measured attainment (the one to go to;
      without a record, its prediction): ``best`` must score above ``current`` — by ``gain`` when
      over capacity (no shape predicted to meet the SLOs).
    """
    cur_m, best_m = record.attainment(current.shape), record.attainment(best.shape)
    before = record.predicted(current.shape)
    if before is not None and abs(current.attainment - before) > record.drift:
        return None
    if cur_m is not None and cur_m >= target:
        return (f"{current.shape} measures {cur_m:.0%} at this load (predicted {current.attainment:.0%}): "
                f"its predicted miss is contradicted")
    if cur_m is None and best_m is None:
        return None
    cur = cur_m if cur_m is not None else current.attainment
    new = best.attainment if best_m is None else min(best.attainment, best_m)
    need = gain if over_capacity else 0.0
    if new > cur + need:
        return None
    src = "measured" if best_m is not None and best_m < best.attainment else "predicted"
    return (f"{best.shape} ({src} {new:.0%}) is not better than {current.shape} "
            f"({'measured' if cur_m is not None else 'predicted'} {cur:.0%}) by {need:.0%} at this load")


def observe(
    record: MeasuredRecord,
    in_place: tuple[Shape, float] | None,
    sig: Signals,
    pending: Shape | None,
    inputs: dict[str, Any],
) -> tuple[Shape, float] | None:
    """One interval into ``record``: the load of ``inputs`` (``arrival_rate``, ``prompt_mean``)
    and, when the shape has been in place (``in_place``: the shape and since when) for a whole
    window, its measured ``attainment``. Returns the new ``in_place``; adds the record's
    per-shape attainment to ``inputs`` (``measured_by_shape``, and ``load_moved`` when cleared)."""
    current = sig.targets
    if sig.actual != current or sig.starting or (pending is not None and pending != sig.actual):
        in_place = None
    elif in_place is None or in_place[0] != current:
        in_place = (current, sig.taken_s)
    steady = in_place is not None and sig.taken_s - in_place[1] >= sig.window_s
    attainment = inputs.get("attainment")
    moved = record.update(
        sig.taken_s,
        float(inputs.get("arrival_rate") or 0.0),
        float(inputs.get("prompt_mean") or 0.0),
        current if steady else None,
        None if attainment is None else float(attainment),
        len(sig.requests),
    )
    inputs["measured_by_shape"] = record.describe()
    inputs["steady_window"] = steady  # the window measured the shape in place alone
    if moved:
        inputs["load_moved"] = True
    return in_place


def revisit_veto(
    left: dict[Shape, tuple[float, float, float]],
    sig: Signals,
    shape: Shape,
    revisit_s: float,
    measured: float | None,
) -> str | None:
    """Why going back to ``shape`` now would repeat a move that measured worse (None: it would not).

    Against oscillation (2 mixed ↔ 1 prefill + 1 decode, 2 ↔ 1): a shape left (``left``: when,
    its measured attainment ``a`` then, the arrival rate then) is not gone back to within
    ``revisit_s`` at a similar arrival rate (±25 %) unless the current shape measures below ``a``
    (``measured``: the window's attainment now).
    """
    entry = left.get(shape)
    if entry is None:
        return None
    at_s, attainment, rate = entry
    similar = abs(sig.arrival_rate - rate) <= 0.25 * max(rate, 1e-9)
    if sig.taken_s - at_s >= revisit_s or not similar or (measured is not None and measured < attainment):
        return None
    now = "not measured yet" if measured is None else f"{measured:.0%}"
    return (f"{shape} was left {sig.taken_s - at_s:.0f} s ago measuring {attainment:.0%} at a similar load; "
            f"the current shape measures {now}")
