"""The router in simulated time: the real placement code, fed the way the dispatcher feeds it.

Nothing of the routing decision is written here: a :class:`SimRouter` holds
the router's own :class:`Registry` and :class:`Placer` (cache index, cost
model, routing policy, ``--disagg-policy``) and makes the calls the
dispatcher makes, in the dispatcher's order, at the simulated instant the
router would make them:

* start: every :class:`SimWorker` registers (``Placer.on_register``, then
  ``Registry.add``), decode workers and mixed ones that take part in
  hand-offs with a stand-in KV descriptor (its layout gives the cost model
  the deployment's KV bytes per token, as ``on_register`` reads them from a
  real layout; they are set directly when no layout writes them exactly);
  the snapshot each registration asks for is answered by the worker one hop
  later, between its steps;
* a request: ``Placer.place`` over the registry's pools
  (``prefill_candidates``: prefill workers and mixed ones with a KV
  descriptor; ``local_candidates``: mixed workers, and decode workers for
  local prefill), then ``Placer.charge`` of the computing worker for the
  prompt's uncached tokens and ``num_inflight`` of each chosen worker
  (``route``);
* the first token reaches the router: ``Placer.credit``
  (``first_token``); the last one: ``num_inflight`` back (``finished``);
* a decode worker's ``KVReceived``: ``Placer.on_transfer`` (its link rate);
* worker → router messages, one hop late: each worker's cache events
  (after every loop iteration: ``publish``), its snapshots, and a heartbeat
  every ``heartbeat_interval_s`` of simulated time between its steps
  (``Registry.heartbeat`` — load and rates — then ``Placer.on_heartbeat``).

Speculative entries and resync deadlines run on the simulated clock (the
placer's ``clock`` seam).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from pdserve.config import Role
from pdserve.router.dispatch_config import DispatcherConfig
from pdserve.router.placement import Placer, local_candidates, prefill_candidates
from pdserve.router.registry import Registry, WorkerInfo
from pdserve.sim.worker import SimWorker
from pdserve.worker import protocol as p


class EventLoop(Protocol):
    """What the router needs of the simulator's event loop."""

    now_s: float

    def at(self, t_s: float, fn: Callable[[], None], background: bool = False) -> None:
        """Run ``fn`` at ``t_s`` (``background``: a timer that does not keep the run going)."""

    def deliver(self, worker: SimWorker, t_s: float, fn: Callable[[], None]) -> None:
        """A message reaching ``worker`` at ``t_s`` (read between its steps)."""

    @property
    def idle(self) -> bool:
        """Nothing left to happen but background timers."""


@dataclass
class Route:
    """Where one request went, why, and the KV it moved."""

    prefill_id: str | None  # None: the decode (or mixed) worker computed the prompt
    decode_id: str
    reason: str
    predicted_cached_tokens: int
    kv_bytes: int = 0

    @property
    def worker_ids(self) -> list[str]:
        """The workers of the request."""
        return [w for w in (self.prefill_id, self.decode_id) if w is not None]


class SimRouter:
    """The router's registry and placer, driven in simulated time."""

    def __init__(
        self,
        loop: EventLoop,
        workers: list[SimWorker],
        config: DispatcherConfig,
        kv_bytes_per_token: int,
        hop_s: float,
        heartbeat_interval_s: float = 0.5,
        seed: int = 0,
        receivers: frozenset[str] = frozenset(),
        num_layers: int = 1,
    ) -> None:
        """``receivers``: the workers that register a KV receiver (decode workers, and mixed ones
        that take part in hand-offs); ``num_layers``: the model's, for their descriptors."""
        self.loop = loop
        self.config = config
        self.hop_s = hop_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.workers = {w.worker_id: w for w in workers}
        self.registry = Registry()
        self.placer = Placer(config, self.registry, self._send, rng=random.Random(seed),
                             clock=lambda: loop.now_s)
        self.routes: dict[str, Route] = {}
        self.kv_bytes = 0
        self._charges: dict[str, tuple[str, int] | None] = {}
        self._heartbeat_due: set[str] = set()
        self.num_layers, self.kv_bytes_per_token = num_layers, kv_bytes_per_token
        for w in workers:
            self.register(w, w.worker_id in receivers)
        if self.placer.cost_params.kv_bytes_per_token != kv_bytes_per_token:  # no layout wrote it exactly
            self.placer.cost_params = replace(self.placer.cost_params, kv_bytes_per_token=kv_bytes_per_token)

    def register(self, w: SimWorker, receiver: bool) -> None:
        """``w`` registers (``receiver``: with a KV receiver's descriptor); at start, and for a worker
        started or flipped later (:mod:`pdserve.sim.elastic`): its entry replaces an earlier one."""
        kv = w.descriptor(self.num_layers, self.kv_bytes_per_token) if receiver else None
        m = w.register_message(kv)
        refusal = self.placer.on_register(m)
        if refusal is not None:
            raise ValueError(f"the router refuses {w.worker_id}: {refusal}")
        self.workers[w.worker_id] = w
        self.registry.add(WorkerInfo.from_register(m))

    def remove(self, worker_id: str) -> None:
        """A worker left (``Dispatcher._worker_lost`` after a drain): its entry and cache entries go."""
        self.workers.pop(worker_id, None)
        if self.registry.remove(worker_id) is not None:
            self.placer.worker_removed(worker_id)

    def info(self, worker_id: str) -> WorkerInfo:
        """The router's entry of a worker."""
        info = self.registry.get(worker_id)
        assert info is not None
        return info

    # -- requests ----------------------------------------------------------------------------

    def route(self, rid: str, token_ids: list[int], max_tokens: int) -> Route | None:
        """Place a request (``Dispatcher._place``); None when no worker can take it."""
        pools = {role: self.registry.by_role(role) for role in Role}
        local = local_candidates(pools, self.config.prefill_fallback)
        prefill = prefill_candidates(pools)  # prefill workers, and mixed ones
        placement = self.placer.place(token_ids, max_tokens, prefill, local)
        if placement is None:
            return None
        computing = placement.prefill_id or placement.decode_id
        self._charges[rid] = self.placer.charge(computing, len(token_ids) - placement.num_cached_tokens)
        route = Route(placement.prefill_id, placement.decode_id, placement.reason,
                      placement.num_cached_tokens)
        for wid in route.worker_ids:
            self.info(wid).num_inflight += 1
        self.routes[rid] = route
        return route

    def first_token(self, rid: str) -> None:
        """A request's first token reached the router: its prompt is computed."""
        self.placer.credit(self._charges.pop(rid, None))

    def finished(self, rid: str) -> None:
        """A request's last token reached the router."""
        self.placer.credit(self._charges.pop(rid, None))
        for wid in self.routes[rid].worker_ids:
            self.info(wid).num_inflight -= 1

    def kv_received(
        self, rid: str, num_bytes: int, transfer_s: float, overlap_s: float | None = None
    ) -> None:
        """D's ``KVReceived`` reached the router (``overlap_s``: P's compute after its first push)."""
        route = self.routes[rid]
        route.kv_bytes += num_bytes
        self.kv_bytes += num_bytes
        self.placer.on_transfer(route.decode_id, num_bytes, transfer_s, overlap_s)

    # -- worker → router -------------------------------------------------------------------------

    def start_heartbeats(self, workers: list[SimWorker] | None = None) -> None:
        """Every worker's (or these ones') first heartbeat now, then one every interval (between steps)."""
        for w in self.workers.values() if workers is None else workers:
            self.loop.at(self.loop.now_s, lambda w=w: self._heartbeat_timer(w), background=True)  # type: ignore[misc]

    def after_iteration(self, worker: SimWorker) -> None:
        """The end of a worker's loop iteration: its cache events, and a heartbeat if one is due."""
        self.publish(worker)
        if worker.worker_id in self._heartbeat_due and not worker.busy:
            self._heartbeat_due.discard(worker.worker_id)
            self._heartbeat(worker)

    def publish(self, worker: SimWorker) -> None:
        """Send the worker's cache events since its last batch (``KVEventPublisher``)."""
        batch = worker.kv_events.take()
        if batch is not None:
            self._to_router(lambda: self.placer.on_events(batch))

    def _heartbeat_timer(self, worker: SimWorker) -> None:
        if self.loop.idle or self.workers.get(worker.worker_id) is not worker:
            return  # the run is over, or the worker left (or flipped: its new self has its own timer)
        if worker.busy:
            self._heartbeat_due.add(worker.worker_id)  # sent when its step ends
        else:
            self._heartbeat(worker)

    def _heartbeat(self, worker: SimWorker) -> None:
        m = p.Heartbeat(worker.worker_id, worker.load(), worker.kv_events.epoch, worker.kv_events.seq)

        def receive() -> None:  # Dispatcher._handle
            if self.registry.heartbeat(m.worker_id, m.load):
                self.placer.on_heartbeat(m)
        self._to_router(receive)
        self.loop.at(self.loop.now_s + self.heartbeat_interval_s, lambda: self._heartbeat_timer(worker),
                     background=True)

    def _send(self, worker_id: str, message: p.Message) -> bool:
        """The placer's channel to a worker: snapshot requests, answered between the worker's steps."""
        worker = self.workers.get(worker_id)
        if worker is None or not isinstance(message, p.KVSnapshotRequest):
            return False

        def answer() -> None:  # Worker._handle: pending events first, then the snapshot
            self.publish(worker)
            snapshot = worker.kv_events.snapshot_message()
            self._to_router(lambda: self.placer.on_snapshot(snapshot))
        self.loop.deliver(worker, self.loop.now_s + self.hop_s, answer)
        return True

    def _to_router(self, fn: Callable[[], None]) -> None:
        self.loop.at(self.loop.now_s + self.hop_s, fn)

    # -- figures -----------------------------------------------------------------------------------

    @property
    def decisions(self) -> dict[str, int]:
        """Placements by reason (the router's ``decisions`` metric)."""
        return dict(sorted(self.placer.decisions.items()))
