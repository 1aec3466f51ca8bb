"""Discrete-event simulation of a pdserve deployment, on the real scheduler, block manager and router.

What is real and what is modelled:

- real: every worker's :class:`Scheduler` and :class:`BlockManager`
  (:class:`SimWorker`), the router's placement — routing policy, cache
  index fed by the workers' own cache events, cost model, conditional
  disaggregation — (:class:`~pdserve.sim.routing.SimRouter` around the
  router's :class:`~pdserve.router.placement.Placer`), the bench's
  :class:`RequestRecord` and summary;
- modelled: a step's duration (a :class:`StepModel`), the KV push
  (:class:`Link`: bandwidth, latency, layer-wise overlap), one router↔worker
  message (``hop_s``: requests, reservations, tokens, cache events,
  heartbeats), the router's own per-request work (``request_overhead_s``)
  and what a hand-off costs more before its first token
  (``handoff_overhead_s``; both measured by ``pdserve profile``, see
  :mod:`pdserve.sim.serving`).

Lifecycle of one request:

1. it arrives; after ``request_overhead_s`` the router places it: a prefill
   side P and a decode side D (remote prefill: P a prefill or mixed worker,
   D a decode or mixed worker, P ≠ D), or one worker that computes the
   prompt itself (a decode worker with ``--disagg-policy`` ``auto``/``never``,
   or a mixed worker); the workers get it one hop later. A local prompt then
   runs like a mixed worker's own (steps 2–4 skipped).
2. D reserves blocks (or queues the reservation until blocks free up); the
   block ids reach P two hops later (D → router → P) and open P's prefill
   gate (P queued the request gated: it computes nothing of it before then);
3. P prefills with everything else it runs; each step pushes the KV of the
   tokens it computed over P's link, layer by layer (a destination known
   after some computing — only without the gate — gets the backlog at once);
4. P's first token reaches the client one hop after the step that sampled
   it; when all KV is pushed, the "done" notice reaches D (link latency) and
   the request joins D's batch; D's ``KVReceived`` reaches the router a hop
   later (the link rate it measured), which has P free its copy a hop after;
5. D decodes; every token reaches the client (and the router) one hop after
   its step.

A message to a busy worker waits for the end of its step (a real worker
reads its socket between steps); a worker's cache events and heartbeats
leave at the end of its loop iteration.

Co-location: a step that starts while another worker of the same host
(:attr:`PoolSpec.host`) is in a step takes its pool's measured slowdown of
the step's kind (:class:`~pdserve.sim.colocation.CoLocation`; a decode step
beside a worker that is only decoding takes the decode-beside-decode figure
when the profile measured it); decided once, at the step's start, from the
other workers' steps then.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdserve.bench.metrics import RequestRecord
from pdserve.config import Role
from pdserve.request import Request, RequestStatus
from pdserve.sampling_params import SamplingParams
from pdserve.sim.link import Link
from pdserve.sim.routing import SimRouter
from pdserve.sim.spec import PoolSpec, SimConfig, SimRequest, SimResult
from pdserve.sim.worker import SIM_TOKEN_ID, SimWorker, StepRecord

__all__ = ["PoolSpec", "SimConfig", "SimRequest", "SimResult", "Simulator"]


@dataclass
class _Handoff:
    prefill: SimWorker
    decode: SimWorker
    dst_known: bool = False
    num_pushed_tokens: int = 0
    pushed_at_s: float = 0.0
    first_push_s: float | None = None  # when the first byte left
    num_bytes: int = 0
    first_token: bool = False
    first_token_s: float | None = None  # when P sampled the first token (its compute ended)
    done: bool = False


class Simulator:
    """Runs :class:`SimRequest` s through a :class:`SimConfig` deployment."""

    def __init__(self, config: SimConfig, record_steps: bool = False) -> None:
        self.config = config
        self.workers: dict[Role, list[SimWorker]] = {}
        self.links: dict[str, Link] = {}
        for pool in config.pools:
            self.workers[pool.role] = [
                SimWorker(f"{pool.role.value}-{i}", pool.role, pool.scheduler or config.scheduler,
                          pool.num_blocks, config.block_size, config.enable_prefix_caching,
                          config.max_model_len, pool.step_model, pool.co_location, pool.host)
                for i in range(pool.count)
            ]
            if pool.link is not None:
                for w in self.workers[pool.role]:
                    self.links[w.worker_id] = Link(pool.link)
        self.by_id = {w.worker_id: w for ws in self.workers.values() for w in ws}
        self._heap: list[tuple[float, int, bool, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._num_live = 0  # events in the heap that are not background timers
        self._inbox: dict[str, list[Callable[[], None]]] = {wid: [] for wid in self.by_id}
        self._handoffs: dict[str, _Handoff] = {}
        self._records: dict[str, RequestRecord] = {}
        self._steps: list[StepRecord] | None = [] if record_steps else None
        self._kick_due: set[str] = set()
        self.now_s = 0.0
        self._end_s = 0.0
        # decode workers take KV in; mixed ones too when they can send it (both sides, or neither)
        receivers = frozenset(wid for wid, w in self.by_id.items()
                              if w.role is Role.DECODE or (w.role is Role.MIXED and wid in self.links))
        self.router = SimRouter(self, list(self.by_id.values()), config.routing, config.kv_bytes_per_token,
                                config.hop_s, config.heartbeat_interval_s, config.seed, receivers,
                                config.num_layers)

    # -- event loop (the router's EventLoop) ------------------------------------------------

    def at(self, t_s: float, fn: Callable[[], None], background: bool = False) -> None:
        """Run ``fn`` at ``t_s``; a ``background`` timer does not keep the run going."""
        heapq.heappush(self._heap, (t_s, next(self._seq), background, fn))
        self._num_live += not background

    @property
    def idle(self) -> bool:
        """Nothing left to happen but background timers (heartbeats)."""
        return self._num_live == 0

    def run(self, requests: Sequence[SimRequest]) -> SimResult:
        """Simulate every request to its end; returns the bench's records in request order."""
        wall0 = time.perf_counter()
        for i, req in enumerate(requests):
            if req.max_tokens < 1 or not req.prompt_token_ids:
                raise ValueError(f"request {i}: needs a prompt and max_tokens ≥ 1")
            if len(req.prompt_token_ids) >= self.config.max_model_len:
                raise ValueError(f"request {i}: {len(req.prompt_token_ids)} prompt tokens do not fit "
                                 f"max_model_len={self.config.max_model_len}")
            self.at(req.arrival_s, lambda i=i, req=req: self._arrive(i, req))  # type: ignore[misc]
        self.router.start_heartbeats()
        while self._heap:
            self.now_s, _, background, fn = heapq.heappop(self._heap)
            if not background:
                self._num_live -= 1
                self._end_s = self.now_s
            fn()
        records = [self._records[f"sim-{i}"] for i in range(len(requests))]
        for r in records:
            if r.e2e_s is None and r.error_type is None:
                r.error_type, r.error = "sim_stalled", "the deployment never finished this request"
        all_workers = list(self.by_id.values())
        routes = self.router.routes
        return SimResult(
            records=records, steps=self._steps,
            num_steps=sum(w.num_steps for w in all_workers),
            num_preemptions=sum(w.scheduler.num_preemptions for w in all_workers),
            busy_s_by_worker={w.worker_id: w.busy_s for w in all_workers},
            end_s=self._end_s, wall_s=time.perf_counter() - wall0,
            routes=[routes[f"sim-{i}"] for i in range(len(requests)) if f"sim-{i}" in routes],
            decisions=self.router.decisions, kv_bytes=self.router.kv_bytes,
        )

    def deliver(self, worker: SimWorker, t_s: float, fn: Callable[[], None]) -> None:
        """A message reaching ``worker`` at ``t_s``; a busy worker reads it after its step."""
        def receive() -> None:
            self._inbox[worker.worker_id].append(fn)
            if not worker.busy and worker.worker_id not in self._kick_due:
                # after every other message due at this instant (a worker drains its socket at once)
                self._kick_due.add(worker.worker_id)
                self.at(self.now_s, lambda: self._kick(worker))
        self.at(t_s, receive)

    def _kick(self, worker: SimWorker) -> None:
        """Between steps: read messages, retry reservations, start the next step."""
        self._kick_due.discard(worker.worker_id)
        if worker.busy:
            return
        inbox = self._inbox[worker.worker_id]
        while inbox:
            inbox.pop(0)()
        for request in worker.retry_pending():  # a decode (or mixed) worker's deferred reservations
            self._reserved(worker, request.request_id)
        duration_s = worker.begin_step(self.now_s, self._steps, self._host_step_kind(worker))
        if duration_s is None:
            self.router.after_iteration(worker)
            return
        if worker.worker_id in self.links:  # a prefill (or mixed) worker may be computing for another
            self._push_step(worker, duration_s)
        self.at(self.now_s + duration_s, lambda: self._step_done(worker))

    def _host_step_kind(self, worker: SimWorker) -> str | None:
        """The kind of step the other workers of ``worker``'s host are in now: ``"prefill"`` when any
        computes prompt tokens, ``"decode"`` when those in a step only decode, None when none is (only
        asked for a worker that slows down)."""
        if worker.co_location is None:
            return None
        kinds = {w.step_kind for w in self.by_id.values() if w is not worker and w.host == worker.host}
        return "prefill" if "prefill" in kinds else "decode" if "decode" in kinds else None

    # -- requests ------------------------------------------------------------------------

    def _make_request(self, rid: str, req: SimRequest) -> Request:
        params = SamplingParams(max_tokens=req.max_tokens, ignore_eos=True)
        return Request(rid, list(req.prompt_token_ids), params, (), arrival_time_s=req.arrival_s)

    def _arrive(self, index: int, req: SimRequest) -> None:
        rid = f"sim-{index}"
        self._records[rid] = RequestRecord(
            index=index, scheduled_s=req.arrival_s, sent_s=req.arrival_s, max_tokens=req.max_tokens,
            num_prompt_tokens=len(req.prompt_token_ids), token_source="usage",
        )
        self.at(self.now_s + self.config.request_overhead_s, lambda: self._route(rid, req))

    def _route(self, rid: str, req: SimRequest) -> None:
        """The router places the request and tells the workers (``Dispatcher._place``)."""
        route = self.router.route(rid, list(req.prompt_token_ids), req.max_tokens)
        if route is None:
            return  # no worker: stays unfinished (reported as stalled)
        t = self.now_s + self.config.hop_s
        decode = self.by_id[route.decode_id]
        if route.prefill_id is None:  # computed where it is decoded (a decode worker's add_request)
            local = self._make_request(rid, req)
            self.deliver(decode, t, lambda: decode.scheduler.add_request(local))
            return
        prefill = self.by_id[route.prefill_id]
        t += self.config.handoff_overhead_s  # measured by `pdserve profile` (pdserve.sim.serving)
        self._handoffs[rid] = _Handoff(prefill, decode)
        p_request, d_request = self._make_request(rid, req), self._make_request(rid, req)
        p_request.prefill_only = True  # held for the hand-off after its first token (a mixed P too)

        def admit() -> None:
            if decode.admit_remote(d_request) is not None:
                self._reserved(decode, rid)
        self.deliver(decode, t, admit)
        # gated, as a prefill worker queues it: nothing is computed before D reserved the KV's home
        self.deliver(prefill, t, lambda: prefill.scheduler.add_request(p_request, gated=True))

    def _emit(self, rid: str, t_s: float, request: Request) -> None:
        rec = self._records[rid]
        rel = t_s - rec.sent_s
        if rec.ttft_s is None:
            rec.ttft_s = rel
            rec.num_cached_tokens = request.num_cached_tokens  # of the worker that computed the prompt
            self.at(t_s, lambda: self.router.first_token(rid))
        rec.chunk_s.append(rel)
        rec.chunk_tokens.append(1)
        rec.num_output_tokens += 1

    def _finish(self, rid: str, t_s: float) -> None:
        rec = self._records[rid]
        rec.e2e_s = t_s - rec.sent_s
        self.at(t_s, lambda: self.router.finished(rid))

    # -- steps -----------------------------------------------------------------------------

    def _step_done(self, worker: SimWorker) -> None:
        t_out = self.now_s + self.config.hop_s
        for request in worker.end_step():
            rid = request.request_id
            self._emit(rid, t_out, request)
            if request.status is RequestStatus.FINISHED_PREFILLED:
                h = self._handoffs[rid]
                h.first_token = True
                h.first_token_s = self.now_s
                self._maybe_done(rid, h)
            elif request.finished:
                self._finish(rid, t_out)
        self.router.after_iteration(worker)
        self._kick(worker)

    # -- KV hand-off -------------------------------------------------------------------------

    def _reserved(self, decode: SimWorker, rid: str) -> None:
        """D reserved blocks: P learns where to write, and what D already caches, two hops later."""
        h = self._handoffs[rid]
        num_cached = decode.scheduler.waiting_for_kv[rid].num_computed_tokens
        self.deliver(h.prefill, self.now_s + 2 * self.config.hop_s,
                     lambda: self._set_destination(rid, num_cached))

    def _set_destination(self, rid: str, num_cached: int = 0) -> None:
        h = self._handoffs[rid]
        h.dst_known = True
        h.num_pushed_tokens = max(h.num_pushed_tokens, num_cached)  # D has those: they are not sent
        sched = h.prefill.scheduler
        request = sched.requests.get(rid) or sched.held.get(rid)
        assert request is not None
        if request.num_computed_tokens > h.num_pushed_tokens:
            link = self.links[h.prefill.worker_id]
            num_bytes = (request.num_computed_tokens - h.num_pushed_tokens) * self.config.kv_bytes_per_token
            self._pushing(h, max(link.free_at_s, self.now_s), num_bytes)
            h.pushed_at_s = link.push(self.now_s, num_bytes)
            h.num_pushed_tokens = request.num_computed_tokens
        self._maybe_done(rid, h)
        sched.open_gate(rid)  # as the worker does on ``Blocks``, after ``KVPusher.set_destination``

    def _push_step(self, prefill: SimWorker, duration_s: float) -> None:
        """The step just scheduled writes KV layer by layer: push it as it is written."""
        link = self.links[prefill.worker_id]
        for item in prefill.current.scheduled:
            h = self._handoffs.get(item.request.request_id)
            if h is None or h.prefill is not prefill or not h.dst_known:
                continue
            end = item.num_computed_tokens + item.num_new_tokens
            if end > h.num_pushed_tokens:
                num_bytes = (end - h.num_pushed_tokens) * self.config.kv_bytes_per_token
                first_layer_s = self.now_s + duration_s / self.config.num_layers
                self._pushing(h, max(link.free_at_s, first_layer_s), num_bytes)
                h.pushed_at_s = link.push_layered(self.now_s, duration_s, self.config.num_layers, num_bytes)
                h.num_pushed_tokens = end

    @staticmethod
    def _pushing(h: _Handoff, start_s: float, num_bytes: int) -> None:
        if h.first_push_s is None:
            h.first_push_s = start_s
        h.num_bytes += num_bytes

    def _maybe_done(self, rid: str, h: _Handoff) -> None:
        prefill = h.prefill
        request = prefill.scheduler.held.get(rid)
        if h.done or not h.first_token or not h.dst_known or request is None:
            return
        if h.num_pushed_tokens < request.num_computed_tokens:
            return
        h.done = True
        link = self.links[prefill.worker_id]
        arrive_s = max(self.now_s, h.pushed_at_s) + link.model.latency_s
        decode = h.decode

        def kv_in() -> None:
            request = decode.scheduler.finish_remote_kv(rid, SIM_TOKEN_ID)
            del self._handoffs[rid]
            transfer_s = self.now_s - (h.first_push_s if h.first_push_s is not None else self.now_s)
            self.at(self.now_s + self.config.hop_s, lambda: self._kv_received(rid, h, transfer_s))
            if request.finished:
                self._finish(rid, self.now_s + self.config.hop_s)
        self.deliver(decode, arrive_s, kv_in)

    def _kv_received(self, rid: str, h: _Handoff, transfer_s: float) -> None:
        """The router gets D's ``KVReceived`` (link rate) and relays ``Release`` to P."""
        overlap_s = None
        if h.first_push_s is not None and h.first_token_s is not None:
            overlap_s = max(h.first_token_s - h.first_push_s, 0.0)
        self.router.kv_received(rid, h.num_bytes, transfer_s, overlap_s)
        prefill = h.prefill
        self.deliver(prefill, self.now_s + self.config.hop_s, lambda: prefill.scheduler.release(rid))

