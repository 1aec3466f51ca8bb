"""Where each attempt goes: routing policy + cache index + cost model, as the dispatcher uses them.

Lifecycle of one placement:

1. ``place`` hashes the tokens to compute (prompt, and outputs of a migrated
   request) with the workers' block size, looks them up in the cache index,
   builds a :class:`~pdserve.router.cost_model.WorkerSnapshot` of every
   candidate (measured rates, queued prompt tokens, load) and lets
   :func:`~pdserve.router.cost_model.plan` choose: remote prefill (P computes,
   KV moves to D) or local (D, or a mixed worker, computes the prompt). Mixed
   workers are candidates on both sides (:func:`prefill_candidates`,
   :func:`local_candidates`). With ``kv_aware`` every candidate competes;
   ``round_robin`` and ``least_loaded`` pick one decode-side worker, then one
   prefill-side worker among the others, and the cost model only decides
   remote or local for that pair (``--disagg-policy`` overrides either way).
2. The chosen workers get speculative index entries for the prompt's blocks
   and the computing worker is charged the uncached prompt tokens
   (``charge``); the decision is counted by reason.
3. ``credit`` gives the charge back once: on the first token, or when the
   attempt ends.

KV messages (events, snapshots, registrations, heartbeats' sequence numbers)
go through ``on_*`` methods, which ask workers for snapshots through ``send``.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from pdserve.config import Role
from pdserve.router import cost_model as cm
from pdserve.router.dispatch_config import DispatcherConfig
from pdserve.router.kv_index import IndexMismatchError, KVIndex
from pdserve.router.policy import RoutingPolicy, make_policy
from pdserve.router.registry import Registry, WorkerInfo
from pdserve.router.step_fit import StepFit
from pdserve.transfer.descriptor import ITEMSIZES
from pdserve.worker import protocol as p

logger = logging.getLogger(__name__)

KV_AWARE = "kv_aware"


@dataclass(frozen=True)
class WorkerCacheView:
    """One worker's prefix cache and measured speed, as the router sees them."""

    prefix_hit_rate: float  # prompt tokens its cache served / looked up (its own counters)
    index_blocks: int  # blocks the index holds for it
    events: int  # cache events applied
    events_per_s: float  # over the last 10 s
    resyncs: int  # snapshots asked for
    resync_pending: bool  # a snapshot is awaited
    degraded: bool  # its snapshot is overdue: only speculative entries are used
    prefill_rate_tps: float | None
    decode_step_s: float | None
    queued_prefill_tokens: int


@dataclass(frozen=True)
class _PeerMeans:
    """Means over the measured workers, for pricing one not measured yet (None: nobody measured)."""

    prefill_rate_tps: float | None
    decode_step_s: float | None
    decode_batch: float
    prefill_fits: dict[str, tuple[float, float] | None]  # per role: the pool's per-step + per-token fit
    prefill_rates: dict[str, float]  # per role: the mean tokens/s of its measured workers
    decode_fits: dict[str, tuple[float, float] | None]  # per role: the pool's per-step + per-sequence fit
    decode_steps: dict[str, tuple[float, float]]  # per role: its measured workers' mean (step s, batch)


class Placer:
    """Chooses workers for an attempt and keeps the cache index current."""

    def __init__(
        self,
        config: DispatcherConfig,
        registry: Registry,
        send: Callable[[str, p.Message], object],
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock``: the time speculative entries and resyncs are judged by (the simulator's own)."""
        self.config = config
        self.registry = registry
        self.send = send
        self.clock = clock
        self.rng = rng or random.Random()
        self.index = KVIndex(
            block_size=config.kv_block_size, speculative_ttl_s=config.speculative_ttl_s, clock=clock
        )
        self.cost_params = cm.CostParams(balance_factor=config.balance_factor)
        self.kv_aware = config.policy == KV_AWARE
        if not self.kv_aware:
            self.prefill_policy: RoutingPolicy = make_policy(config.policy)
            self.decode_policy: RoutingPolicy = make_policy(config.policy)
        self.decisions: Counter[str] = Counter()
        self.num_balanced = 0  # placements the load bound moved off a worker holding more of the prompt

    # -- placement ------------------------------------------------------------------------

    def place(
        self,
        token_ids: Sequence[int],
        num_outputs: int,
        prefill: list[WorkerInfo],
        local: list[WorkerInfo],
    ) -> cm.Placement | None:
        """Choose prefill (None: local) and decode workers for these tokens, or None without candidates."""
        if not self.kv_aware:
            n = len(token_ids)
            local = [self.decode_policy.pick(local, n)] if local else []
            # A worker paired with itself is the local option: pick the prefill side among the others.
            others = [w for w in prefill if not local or w.worker_id != local[0].worker_id]
            prefill = [self.prefill_policy.pick(others, n)] if others else []
        hashes = self.index.hash_prompt(token_ids)
        ids = [w.worker_id for w in (*prefill, *local)]
        cached = self.index.match(hashes, ids) if hashes else dict.fromkeys(ids, 0)
        peers = self._peer_means()
        placement = cm.plan(
            num_tokens=len(token_ids),
            num_outputs=num_outputs,
            cached_blocks=cached,
            block_size=self.index.block_size or 1,
            prefill=[self._snapshot(w, peers) for w in prefill],
            local=[self._snapshot(w, peers) for w in local],
            params=self.cost_params,
            rng=self.rng,
            disagg_policy=self.config.disagg_policy,
        )
        if placement is None:
            return None
        self.decisions[placement.reason] += 1
        self.num_balanced += placement.balanced
        for wid in (placement.prefill_id, placement.decode_id):
            if wid is not None:
                self.index.add_speculative(wid, hashes)
        return placement

    def charge(self, worker_id: str, num_tokens: int) -> tuple[str, int] | None:
        """Count ``num_tokens`` prompt tokens queued on a worker; returns the charge to credit later
        (the worker's id and the charge's)."""
        info = self.registry.get(worker_id)
        if info is None or num_tokens <= 0:
            return None
        return worker_id, info.perf.charge(num_tokens, self.clock())

    def credit(self, charge: tuple[str, int] | None) -> None:
        """Give a charge back once (its tokens are computed, or the attempt ended)."""
        if charge is None:
            return
        info = self.registry.get(charge[0])
        if info is not None:
            info.perf.credit(charge[1])

    def _peer_means(self) -> _PeerMeans:
        """What the measured workers average: a worker not measured yet is priced like its peers.

        Without this a new worker (just started, or a replacement) was priced at
        ``CostParams``' defaults, and where the measured workers are faster than
        those, it got no traffic until it was measured, which it never was.
        """
        workers = self.registry.all()
        roles = {w.role.value for w in workers}
        fits = {
            r: StepFit.merged(w.perf.prefill_fit for w in workers if w.role.value == r).solve() for r in roles
        }
        decode_fits = {
            r: StepFit.merged(w.perf.decode_fit for w in workers if w.role.value == r).solve() for r in roles
        }
        pool_rates: dict[str, list[float]] = {}  # per role: its measured workers' tokens/s
        pool_steps: dict[str, list[tuple[float, float]]] = {}  # per role: (decode step s, its batch)
        for w in workers:
            if w.perf.prefill_rate_tps:
                pool_rates.setdefault(w.role.value, []).append(w.perf.prefill_rate_tps)
            if w.perf.decode_step_s is not None:
                pool_steps.setdefault(w.role.value, []).append((w.perf.decode_step_s, w.perf.decode_batch))
        rates = [r for pool in pool_rates.values() for r in pool]
        steps = [s for pool in pool_steps.values() for s in pool]
        return _PeerMeans(
            prefill_rate_tps=sum(rates) / len(rates) if rates else None,
            decode_step_s=sum(s for s, _ in steps) / len(steps) if steps else None,
            decode_batch=sum(b for _, b in steps) / len(steps) if steps else 1.0,
            prefill_fits=fits,
            prefill_rates={r: sum(v) / len(v) for r, v in pool_rates.items()},
            decode_fits=decode_fits,
            decode_steps={r: (sum(s for s, _ in v) / len(v), sum(b for _, b in v) / len(v))
                          for r, v in pool_steps.items()},
        )

    def _snapshot(self, w: WorkerInfo, peers: _PeerMeans) -> cm.WorkerSnapshot:
        load, perf = w.load, w.perf
        used = load.num_total_blocks - load.num_free_blocks  # cached free blocks can be evicted
        usage = min(max(used / load.num_total_blocks, 0.0), 1.0) if load.num_total_blocks else 0.0
        # its pool's fit (step_fit.py): the pool's workers run one model on one kind of hardware,
        # and a worker priced by its own few samples could look slower by noise alone, lose every
        # new prompt and never be measured again. Until the pool's fit can be solved (the first
        # seconds of a run, when every prompt was a new document's: the same tokens per step), the
        # pool's mean tokens/s prices every worker of it alike, for the same reason: a worker's
        # own rate then reflects its first, warming-up steps and what it happened to compute, and
        # in S6 it sent four of six new documents to one of three prefill workers (57/15/14).
        fit = peers.prefill_fits.get(w.role.value)
        # (a worker measured itself only if its pool has a mean: no own-rate fallback is needed)
        rate = peers.prefill_rates.get(w.role.value) or peers.prefill_rate_tps
        # what is left of its queue now: its charges computed in order since dispatch (worker_perf.py)
        queued = perf.queued_at(self.clock(), 1 / fit[1] if fit and fit[1] > 0 else rate)
        # Decode is priced by the pool too, for the same reason: each worker's own mean step depends
        # on the batches it happened to run (14-28 ms on three equal mixed workers in S6's first
        # seconds), and 16 output tokens at the slowest-looking one's step lost it every new document
        # (one of three got 1 of 12 and the others' caches overflowed: 0.88 of the ideal hits).
        decode_fit = peers.decode_fits.get(w.role.value)
        step, batch = peers.decode_steps.get(w.role.value) or (peers.decode_step_s, peers.decode_batch)
        return cm.WorkerSnapshot(
            worker_id=w.worker_id,
            role=w.role.value,
            queued_prefill_tokens=queued,
            prefill_rate_tps=rate,
            num_running=max(load.num_running, w.num_inflight - load.num_waiting),
            num_waiting=load.num_waiting + load.num_waiting_for_kv,
            kv_usage=usage,
            decode_step_s=step,
            decode_batch=batch,
            link_bytes_per_s=perf.link_bytes_per_s,
            kv_handoff=w.kv is not None,
            num_inflight=w.num_inflight,
            held_blocks=self.index.held_blocks(w.worker_id),
            prefill_step_s=fit[0] if fit else 0.0,
            prefill_token_s=fit[1] if fit else None,
            decode_base_s=decode_fit[0] if decode_fit else 0.0,
            decode_seq_s=decode_fit[1] if decode_fit else None,
        )

    # -- KV messages ---------------------------------------------------------------------------

    def on_register(self, m: p.Register) -> str | None:
        """Check a registration against the index; the reason to refuse it, or None (then indexed)."""
        try:
            if m.prefix_caching:
                self.index.check_worker(m.block_size, m.hash_scheme)
        except IndexMismatchError as exc:
            return str(exc)
        if m.kv is not None and not self.cost_params.kv_bytes_per_token:
            layout = m.kv.layout
            per_token = (
                2 * layout.num_layers * layout.num_kv_heads * layout.head_dim * ITEMSIZES[layout.dtype]
            )
            self.cost_params = replace(self.cost_params, kv_bytes_per_token=per_token)
        if m.prefix_caching:
            self.index.add_worker(m.worker_id, m.block_size, m.kv_epoch)
            self.send(m.worker_id, p.KVSnapshotRequest())
        else:
            self.index.remove_worker(m.worker_id)
        return None

    def on_events(self, m: p.KVEvents) -> None:
        """Apply a batch of a worker's cache events (a resync when it does not fit)."""
        events = ((e.kind, e.block_hash, e.parent_hash) for e in m.events)
        if self.index.apply_events(m.worker_id, m.epoch, m.seq, events):
            self.send(m.worker_id, p.KVSnapshotRequest())

    def on_snapshot(self, m: p.KVSnapshot) -> None:
        """Replace a worker's entries with its snapshot."""
        self.index.apply_snapshot(m.worker_id, m.epoch, m.seq, m.blocks)

    def on_heartbeat(self, m: p.Heartbeat) -> None:
        """A heartbeat's sequence number shows a lost batch at once."""
        if self.index.check_heartbeat(m.worker_id, m.kv_epoch, m.kv_seq):
            self.send(m.worker_id, p.KVSnapshotRequest())

    def on_transfer(
        self, decode_id: str, num_bytes: int, transfer_s: float, overlap_s: float | None = None
    ) -> None:
        """A KV transfer into ``decode_id`` completed: its link rate (see ``WorkerPerf.on_transfer``)."""
        info = self.registry.get(decode_id)
        if info is not None:
            info.perf.on_transfer(num_bytes, transfer_s, overlap_s)

    def worker_removed(self, worker_id: str) -> None:
        """A worker is gone: its entries go with it."""
        self.index.remove_worker(worker_id)

    def summary(self) -> dict[str, object]:
        """Routing figures for ``/pdserve/workers`` and ``pdserve status``."""
        return {
            "policy": self.config.policy,
            "disagg_policy": self.config.disagg_policy,
            "block_size": self.index.block_size,
            "index_blocks": self.index.size,
            "speculative_blocks": self.index.num_speculative,
            "resyncs": self.index.num_resyncs,
            "decisions": dict(self.decisions),
            "balance_factor": self.cost_params.balance_factor,
            "balanced": self.num_balanced,
        }

    def worker_view(self, w: WorkerInfo) -> WorkerCacheView:
        """One worker's cache and cost-model figures, as the router sees them."""
        state = self.index.workers.get(w.worker_id)
        load = w.load
        return WorkerCacheView(
            prefix_hit_rate=load.prefix_hit_tokens / load.prefix_query_tokens
            if load.prefix_query_tokens
            else 0.0,
            index_blocks=len(state.hashes) if state else 0,
            events=state.num_events if state else 0,
            events_per_s=self.index.events_per_s(w.worker_id),
            resyncs=state.num_resyncs if state else 0,
            resync_pending=bool(state and state.resync_since_s is not None),
            degraded=bool(state and state.degraded),
            prefill_rate_tps=w.perf.prefill_rate_tps,
            decode_step_s=w.perf.decode_step_s,
            queued_prefill_tokens=w.perf.queued_prefill_tokens,
        )

    def tick(self) -> None:
        """Ask again for snapshots that did not come (their workers are routed approximately meanwhile)."""
        for worker_id in self.index.due_resyncs():
            self.send(worker_id, p.KVSnapshotRequest())


def prefill_candidates(registry_pools: dict[Role, list[WorkerInfo]]) -> list[WorkerInfo]:
    """Workers that may compute a prompt and hand its KV to another: prefill workers, and mixed
    ones that have a KV sender and receiver (they registered a KV descriptor)."""
    return registry_pools[Role.PREFILL] + [w for w in registry_pools[Role.MIXED] if w.kv is not None]


def local_candidates(
    registry_pools: dict[Role, list[WorkerInfo]], prefill_fallback: bool
) -> list[WorkerInfo]:
    """Workers that may decode, and compute a prompt themselves: mixed ones, and decode ones
    (conditional disaggregation; with no prefill candidate, only when the prefill fallback is on).

    Decode and mixed workers with a KV receiver are also the decode side of remote placements.
    """
    decode = registry_pools[Role.DECODE]
    may_decode_prefill = bool(prefill_candidates(registry_pools)) or prefill_fallback
    return registry_pools[Role.MIXED] + (decode if may_decode_prefill else [])
