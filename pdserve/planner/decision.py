"""One planner decision as a record: what it saw, what it chose and why (``Decision.as_dict()``
is what ``/pdserve/planner``, ``/metrics`` and the trace log show)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdserve.planner.predict import Prediction
from pdserve.planner.signals import Shape


@dataclass(frozen=True)
class Decision:
    """One interval's decision, with its inputs and predictions (see :meth:`as_dict`)."""

    at_s: float
    action: str
    current: Shape
    target: Shape
    reason: str
    inputs: dict[str, Any]
    chosen: Prediction | None
    candidates: tuple[Prediction, ...] = ()
    over_capacity: bool = False
    given_up: tuple[str, ...] = ()

    @property
    def changes(self) -> bool:
        """The target differs from the current one (a scale call is due)."""
        return self.target != self.current

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for the router's history, ``/metrics`` and the trace log."""
        return {
            "at_unix_s": round(self.at_s, 3),
            "action": self.action,
            "current": self.current.targets(),
            "target": self.target.targets(),
            "shape": str(self.target),
            "reason": self.reason,
            "inputs": self.inputs,
            "predicted": None if self.chosen is None else self.chosen.as_dict(),
            "candidates": [c.as_dict() for c in self.candidates],
            "over_capacity": self.over_capacity,
            "given_up": list(self.given_up),
        }
