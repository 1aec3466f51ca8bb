"""The shapes a planner decision weighs: every one within the budget.

With a core budget and a measured thread table (:mod:`pdserve.planner.thread_scaling`) a shape is
workers × threads (all workers of a shape at one count) and costs cores; without, the threads are
not the planner's and the shapes carry none (:func:`at_threads` drops the workers' counts from the
signals so that the shape in place is one of the candidates).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from pdserve.planner.signals import Shape, Signals

if TYPE_CHECKING:
    from pdserve.planner.planner import PlannerConfig


def candidates(cfg: PlannerConfig) -> list[Shape]:
    """Every shape within the budget, cheapest (fewest cores) first."""
    out: list[Shape] = []
    for t in cfg.thread_options or (0,):
        most = min(cfg.max_workers, cfg.max_cores // t) if t and cfg.max_cores else cfg.max_workers
        for n in range(cfg.min_workers, most + 1):
            if cfg.allow_aggregated:
                out.append(Shape(mixed=n, threads=t))
            if cfg.allow_disaggregated:
                out.extend(Shape(prefill=p, decode=n - p, threads=t) for p in range(1, n))
    return sorted(out, key=lambda s: s.cores)


def at_threads(sig: Signals, cfg: PlannerConfig) -> Signals:
    """``sig`` with the thread counts the planner reasons about: none unless it chooses them."""
    if cfg.thread_options:
        return sig
    return dataclasses.replace(sig, targets=dataclasses.replace(sig.targets, threads=0),
                               actual=dataclasses.replace(sig.actual, threads=0))

