"""Routing policies: which worker of a pool gets the next request.

Every policy implements ``pick(candidates, num_prompt_tokens)``; the router
calls it once for the prefill pool and once for the decode pool (or once for
the mixed pool). Register new policies in ``POLICIES``.

``kv_aware`` (the default) is different: the router's placement
(:mod:`pdserve.router.placement`) scores every candidate with the cache index
and the cost model (:mod:`pdserve.router.cost_model`) instead of asking it to
pick; its ``pick`` is only the load-based choice used without a prompt.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod

from pdserve.router.registry import WorkerInfo


class RoutingPolicy(ABC):
    """Chooses one worker among candidates (never empty)."""

    name: str

    @abstractmethod
    def pick(self, candidates: list[WorkerInfo], num_prompt_tokens: int) -> WorkerInfo:
        """The worker that gets the request."""


class RoundRobin(RoutingPolicy):
    """Each pool in turn, ignoring load."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, candidates: list[WorkerInfo], num_prompt_tokens: int) -> WorkerInfo:
        return candidates[next(self._counter) % len(candidates)]


class LeastLoaded(RoutingPolicy):
    """The worker with the fewest requests in flight, then the most free KV blocks.

    In-flight counts are the router's own (updated on every dispatch and
    finish), so they are exact between heartbeats; free blocks come from the
    latest heartbeat.
    """

    name = "least_loaded"

    def pick(self, candidates: list[WorkerInfo], num_prompt_tokens: int) -> WorkerInfo:
        def key(w: WorkerInfo) -> tuple[int, float]:
            free = w.load.num_free_blocks / w.load.num_total_blocks if w.load.num_total_blocks else 1.0
            return (w.num_inflight + w.load.num_waiting, -free)

        return min(candidates, key=key)


class KVAware(LeastLoaded):
    """Cache- and cost-aware placement (see the module docstring); alone, picks like ``least_loaded``."""

    name = "kv_aware"


DEFAULT_POLICY = KVAware.name
POLICIES: dict[str, type[RoutingPolicy]] = {p.name: p for p in (KVAware, RoundRobin, LeastLoaded)}


def make_policy(name: str) -> RoutingPolicy:
    """A policy by name; unknown names raise ValueError listing the known ones."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}") from None
