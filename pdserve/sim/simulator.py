"""Discrete-event simulation of a pdserve deployment, on the real scheduler, block manager and router policy.

What is real and what is modelled:

- real: every worker's :class:`Scheduler` and :class:`BlockManager`
  (:class:`SimWorker`), the router's :class:`RoutingPolicy` (picking among
  :class:`WorkerInfo` entries whose load is refreshed after every step, as a
  heartbeat would), the bench's :class:`RequestRecord` and summary;
- modelled: a step's duration (a :class:`StepModel`), the KV push
  (:class:`Link`: bandwidth, latency, layer-wise overlap), one router↔worker
  message (``hop_s``) and the router's own per-request work
  (``request_overhead_s``).

Lifecycle of one request (disaggregated; aggregated skips 3–5):

1. it arrives; after ``request_overhead_s`` the policy picks a prefill worker
   P and a decode worker D; both get the request one hop later;
2. D reserves blocks (or queues the reservation until blocks free up); the
   block ids reach P two hops later (D → router → P);
3. P prefills with everything else it runs; each step pushes the KV of the
   tokens it computed over P's link, layer by layer, once the destination is
   known (a late destination gets the backlog at once);
4. P's first token reaches the client one hop after the step that sampled
   it; when all KV is pushed, the "done" notice reaches D (link latency) and
   the request joins D's batch; P frees its copy two hops later;
5. D decodes; every token reaches the client one hop after its step.

A message to a busy worker waits for the end of its step (a real worker
reads its socket between steps).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pdserve.bench.metrics import RequestRecord
from pdserve.config import Role, SchedulerConfig
from pdserve.request import Request, RequestStatus
from pdserve.router.policy import RoutingPolicy, make_policy
from pdserve.sampling_params import SamplingParams
from pdserve.sim.link import Link, LinkModel
from pdserve.sim.step_model import StepModel
from pdserve.sim.worker import SIM_TOKEN_ID, SimWorker, StepRecord


@dataclass(frozen=True)
class PoolSpec:
    """One pool of identical workers.

    Attributes:
        role: mixed, prefill or decode.
        count: workers in the pool.
        step_model: step durations of one worker.
        num_blocks: KV blocks of one worker.
        link: the outgoing KV link of one worker (prefill pools).
        num_gpus: accelerators per worker (TP degree), for costs.
        price_per_hour: cost of one worker per hour.
        label: what the pool runs on (hardware and TP, or this machine).
        scheduler: this pool's scheduler settings (None: the deployment's).
    """

    role: Role
    count: int
    step_model: StepModel
    num_blocks: int
    link: LinkModel | None = None
    num_gpus: int = 1
    price_per_hour: float = 0.0
    label: str = ""
    scheduler: SchedulerConfig | None = None

    def __post_init__(self) -> None:
        if self.count < 1 or self.num_blocks < 1:
            raise ValueError(f"a {self.role} pool needs ≥ 1 worker and ≥ 1 block (got {self.count}, "
                             f"{self.num_blocks})")
        if self.role is Role.PREFILL and self.link is None:
            raise ValueError("a prefill pool needs a KV link model")


@dataclass(frozen=True)
class SimConfig:
    """A deployment to simulate: one mixed pool, or a prefill and a decode pool."""

    pools: tuple[PoolSpec, ...]
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    block_size: int = 16
    enable_prefix_caching: bool = True
    max_model_len: int = 4096
    num_layers: int = 1
    kv_bytes_per_token: int = 0
    policy: str = "least_loaded"
    hop_s: float = 0.0002
    request_overhead_s: float = 0.001

    def __post_init__(self) -> None:
        roles = sorted(p.role.value for p in self.pools)
        if roles not in (["mixed"], ["decode", "prefill"]):
            raise ValueError(f"pools must be one mixed pool or one prefill + one decode pool, got {roles}")
        make_policy(self.policy)  # unknown names list the known ones

    @property
    def disaggregated(self) -> bool:
        """True for a prefill + decode deployment."""
        return any(p.role is Role.PREFILL for p in self.pools)

    def pool(self, role: Role) -> PoolSpec:
        """The pool of ``role``."""
        return next(p for p in self.pools if p.role is role)


@dataclass(frozen=True)
class SimRequest:
    """One request: when it arrives (s), its prompt's token ids and the tokens asked for."""

    arrival_s: float
    prompt_token_ids: tuple[int, ...]
    max_tokens: int


@dataclass
class SimResult:
    """Per-request records (the bench's), the steps if asked for, and the simulator's own cost."""

    records: list[RequestRecord]
    steps: list[StepRecord] | None
    num_steps: int
    num_preemptions: int
    busy_s_by_worker: dict[str, float]
    end_s: float
    wall_s: float


@dataclass
class _Handoff:
    decode: SimWorker
    dst_known: bool = False
    num_pushed_tokens: int = 0
    pushed_at_s: float = 0.0
    first_token: bool = False
    done: bool = False


class Simulator:
    """Runs :class:`SimRequest` s through a :class:`SimConfig` deployment."""

    def __init__(self, config: SimConfig, record_steps: bool = False) -> None:
        self.config = config
        self.workers: dict[Role, list[SimWorker]] = {}
        self.policies: dict[Role, RoutingPolicy] = {}
        self.links: dict[str, Link] = {}
        for pool in config.pools:
            self.workers[pool.role] = [
                SimWorker(f"{pool.role.value}-{i}", pool.role, pool.scheduler or config.scheduler,
                          pool.num_blocks, config.block_size, config.enable_prefix_caching,
                          config.max_model_len, pool.step_model)
                for i in range(pool.count)
            ]
            self.policies[pool.role] = make_policy(config.policy)
            if pool.link is not None:
                for w in self.workers[pool.role]:
                    self.links[w.worker_id] = Link(pool.link)
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._inbox: dict[str, list[Callable[[], None]]] = {
            w.worker_id: [] for ws in self.workers.values() for w in ws
        }
        self._handoffs: dict[str, _Handoff] = {}
        self._records: dict[str, RequestRecord] = {}
        self._placed: dict[str, list[SimWorker]] = {}
        self._steps: list[StepRecord] | None = [] if record_steps else None
        self._kick_due: set[str] = set()
        self.now_s = 0.0

    # -- event loop --------------------------------------------------------------------

    def _at(self, t_s: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (t_s, next(self._seq), fn))

    def run(self, requests: Sequence[SimRequest]) -> SimResult:
        """Simulate every request to its end; returns the bench's records in request order."""
        wall0 = time.perf_counter()
        for i, req in enumerate(requests):
            if req.max_tokens < 1 or not req.prompt_token_ids:
                raise ValueError(f"request {i}: needs a prompt and max_tokens ≥ 1")
            if len(req.prompt_token_ids) >= self.config.max_model_len:
                raise ValueError(f"request {i}: {len(req.prompt_token_ids)} prompt tokens do not fit "
                                 f"max_model_len={self.config.max_model_len}")
            self._at(req.arrival_s, lambda i=i, req=req: self._arrive(i, req))  # type: ignore[misc]
        while self._heap:
            self.now_s, _, fn = heapq.heappop(self._heap)
            fn()
        records = [self._records[f"sim-{i}"] for i in range(len(requests))]
        for r in records:
            if r.e2e_s is None:
                r.error_type, r.error = "sim_stalled", "the deployment never finished this request"
        all_workers = [w for ws in self.workers.values() for w in ws]
        return SimResult(
            records=records, steps=self._steps,
            num_steps=sum(w.num_steps for w in all_workers),
            num_preemptions=sum(w.scheduler.num_preemptions for w in all_workers),
            busy_s_by_worker={w.worker_id: w.busy_s for w in all_workers},
            end_s=self.now_s, wall_s=time.perf_counter() - wall0,
        )

    def _send(self, worker: SimWorker, t_s: float, fn: Callable[[], None]) -> None:
        """Deliver a message at ``t_s``; a busy worker reads it after its step."""
        def deliver() -> None:
            self._inbox[worker.worker_id].append(fn)
            if not worker.busy and worker.worker_id not in self._kick_due:
                # after every other message due at this instant (a worker drains its socket at once)
                self._kick_due.add(worker.worker_id)
                self._at(self.now_s, lambda: self._kick(worker))
        self._at(t_s, deliver)

    def _kick(self, worker: SimWorker) -> None:
        """Between steps: read messages, retry reservations, start the next step."""
        self._kick_due.discard(worker.worker_id)
        if worker.busy:
            return
        inbox = self._inbox[worker.worker_id]
        while inbox:
            inbox.pop(0)()
        if worker.role is Role.DECODE:
            for request in worker.retry_pending():
                self._reserved(worker, request.request_id)
        duration_s = worker.begin_step(self.now_s, self._steps)
        if duration_s is None:
            return
        if worker.role is Role.PREFILL:
            self._push_step(worker, duration_s)
        self._at(self.now_s + duration_s, lambda: self._step_done(worker))

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
        t = self.now_s + self.config.request_overhead_s + self.config.hop_s
        num_prompt = len(req.prompt_token_ids)
        if not self.config.disaggregated:
            worker = self._pick(Role.MIXED, num_prompt)
            self._placed[rid] = [worker]
            request = self._make_request(rid, req)
            self._send(worker, t, lambda: worker.scheduler.add_request(request))
            return
        prefill, decode = self._pick(Role.PREFILL, num_prompt), self._pick(Role.DECODE, num_prompt)
        self._placed[rid] = [prefill, decode]
        self._handoffs[rid] = _Handoff(decode)
        p_request, d_request = self._make_request(rid, req), self._make_request(rid, req)
        self._send(prefill, t, lambda: prefill.scheduler.add_request(p_request))

        def admit() -> None:
            if decode.admit_remote(d_request) is not None:
                self._reserved(decode, rid)
        self._send(decode, t, admit)

    def _pick(self, role: Role, num_prompt_tokens: int) -> SimWorker:
        workers = self.workers[role]
        info = self.policies[role].pick([w.info for w in workers], num_prompt_tokens)
        worker = next(w for w in workers if w.info is info)
        worker.info.num_inflight += 1
        return worker

    def _emit(self, rid: str, t_s: float) -> None:
        rec = self._records[rid]
        rel = t_s - rec.sent_s
        if rec.ttft_s is None:
            rec.ttft_s = rel
        rec.chunk_s.append(rel)
        rec.chunk_tokens.append(1)
        rec.num_output_tokens += 1

    def _finish(self, rid: str, t_s: float) -> None:
        rec = self._records[rid]
        rec.e2e_s = t_s - rec.sent_s
        for w in self._placed.pop(rid):
            w.info.num_inflight -= 1

    # -- steps -----------------------------------------------------------------------------

    def _step_done(self, worker: SimWorker) -> None:
        t_out = self.now_s + self.config.hop_s
        for request in worker.end_step():
            rid = request.request_id
            if request.status is RequestStatus.FINISHED_PREFILLED:
                self._emit(rid, t_out)
                h = self._handoffs[rid]
                h.first_token = True
                self._maybe_done(worker, rid, h)
                continue
            self._emit(rid, t_out)
            if request.finished:
                self._finish(rid, t_out)
        self._kick(worker)

    # -- KV hand-off -------------------------------------------------------------------------

    def _reserved(self, decode: SimWorker, rid: str) -> None:
        """D reserved blocks: P learns where to write two hops later."""
        prefill = self._placed[rid][0]
        self._send(prefill, self.now_s + 2 * self.config.hop_s, lambda: self._set_destination(prefill, rid))

    def _set_destination(self, prefill: SimWorker, rid: str) -> None:
        h = self._handoffs[rid]
        h.dst_known = True
        sched = prefill.scheduler
        request = sched.requests.get(rid) or sched.held.get(rid)
        assert request is not None
        if request.num_computed_tokens > h.num_pushed_tokens:
            num_bytes = (request.num_computed_tokens - h.num_pushed_tokens) * self.config.kv_bytes_per_token
            h.pushed_at_s = self.links[prefill.worker_id].push(self.now_s, num_bytes)
            h.num_pushed_tokens = request.num_computed_tokens
        self._maybe_done(prefill, rid, h)

    def _push_step(self, prefill: SimWorker, duration_s: float) -> None:
        """The step just scheduled writes KV layer by layer: push it as it is written."""
        link = self.links[prefill.worker_id]
        for item in prefill.current.scheduled:
            h = self._handoffs.get(item.request.request_id)
            if h is None or not h.dst_known:
                continue
            end = item.num_computed_tokens + item.num_new_tokens
            if end > h.num_pushed_tokens:
                num_bytes = (end - h.num_pushed_tokens) * self.config.kv_bytes_per_token
                h.pushed_at_s = link.push_layered(self.now_s, duration_s, self.config.num_layers, num_bytes)
                h.num_pushed_tokens = end

    def _maybe_done(self, prefill: SimWorker, rid: str, h: _Handoff) -> None:
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
            # D reports KVReceived; the router relays Release to P.
            self._send(prefill, self.now_s + 2 * self.config.hop_s, lambda: prefill.scheduler.release(rid))
            if request.finished:
                self._finish(rid, self.now_s + self.config.hop_s)
        self._send(decode, arrive_s, kv_in)
