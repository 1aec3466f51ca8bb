"""The SLO planner in simulated time: the real planner, supervisor and router deployment code.

Nothing of the planner or of scaling is written here. A :class:`PlannedSimulator`
is a :class:`~pdserve.sim.simulator.Simulator` whose deployment changes shape
the way a ``pdserve serve --planner slo`` deployment does, by the same code:

* every ``interval_s`` of simulated time, :func:`pdserve.planner.planner.decide`
  on a :class:`~pdserve.planner.signals.Signals` assembled
  (:func:`~pdserve.planner.signals.assemble`) from what the router would
  answer: its most recent ended requests (arrival, lengths, TTFT with its
  breakdown, ITL) and those in flight, its registered workers' heartbeat load and measured
  rates, and the deployment view of the router's real
  :class:`~pdserve.router.deployment.Deployment`;
* a target that changes is set with ``Deployment.scale`` (what
  ``POST /pdserve/scale`` calls; a refusal clears the planner's pending
  target, as the runner does), and the decision is reported to the router's
  real :class:`~pdserve.router.planner_board.PlannerBoard` (history with
  ``measured_after``, and the early-shedding limit, which the router's real
  :class:`~pdserve.router.admission.Admission` applies to arrivals: 429);
* the real :class:`~pdserve.launch.supervisor.Supervisor` syncs with that
  ``Deployment`` every ``sync_interval_s`` and reconciles the pools — role
  flips first, new workers where short, drain before removal, make before
  break — through a simulated :class:`~pdserve.launch.base.Backend`.

What the simulated processes do (the only modelled part):

* a started worker registers ``start_s`` after the supervisor started it
  (a fresh cache, the role's pool spec in ``templates``);
* a drained worker (``Deployment.drain`` marks it, the supervisor then
  terminates it) finishes what it has — its running requests, its
  reservations, the KV it holds for a hand-off — and leaves the router;
* a flipped worker (``Deployment.flip`` marks it draining and sends it
  ``Flip``, one hop) finishes what it has, then registers in its new role
  ``flip_s`` later, with a fresh cache (a real flip keeps the weights and
  rebuilds the cache);
* a worker sent ``SetThreads`` (one hop) steps from then on with the step
  model measured at that thread count (``thread_templates``: the profile
  taken with that many threads), and reports the count in its heartbeats;
* a request the router cannot place (no worker takes new requests, e.g.
  while the only one flips) gets the dispatcher's 503.

Whether a worker finished draining is looked at on every supervisor tick
(``sync_interval_s``), so a drain or flip ends up to one tick late.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pdserve.bench.metrics import RequestRecord
from pdserve.config import Role
from pdserve.launch.base import WorkerSpec
from pdserve.launch.supervisor import Supervisor, SupervisorConfig
from pdserve.planner.decision import Decision
from pdserve.planner.planner import PlannerConfig, PlannerState, decide
from pdserve.planner.runner import shed_limit
from pdserve.planner.signals import Signals
from pdserve.request import Request
from pdserve.router.admission import Admission, Ticket
from pdserve.router.deployment import Deployment
from pdserve.router.errors import APIError
from pdserve.router.planner_board import PlannerBoard
from pdserve.sim.elastic_signals import planner_signals
from pdserve.sim.link import Link
from pdserve.sim.sim_processes import DispatcherStandIn, SimBackend, SimChannel, SimProcess
from pdserve.sim.simulator import Simulator
from pdserve.sim.spec import PoolSpec, SimConfig, SimRequest, SimResult
from pdserve.sim.worker import SimWorker

#: ``benchmarks/results/s9_elasticity.json`` (tiny, local launcher, this 2-core machine): median
#: seconds from ``pdserve scale`` to the first request served by a new process, and by a flipped worker.
START_S = 5.7
FLIP_S = 0.65


@dataclass(frozen=True)
class ElasticConfig:
    """The planner's settings and how simulated workers start and flip.

    Attributes:
        planner: the SLOs, budget and safeguards (``pdserve serve``'s planner options).
        templates: one worker of each role as the supervisor starts it (step model, blocks, link).
        interval_s: simulated seconds between decisions.
        window_s: seconds of traffic each decision reads.
        start_s: a new worker registers this long after it is started.
        flip_s: a drained worker registers in its new role this long after its last request.
        sync_interval_s: the supervisor's pass (its ``sync_interval_s``).
        base_threads: the threads ``templates`` were measured at (0: not known).
        thread_templates: the pool specs measured at other thread counts, by count (a worker started
            with, or set to, a count found here steps with its spec's step model).
    """

    planner: PlannerConfig
    templates: Mapping[Role, PoolSpec]
    interval_s: float = 10.0
    window_s: float = 30.0
    start_s: float = START_S
    flip_s: float = FLIP_S
    sync_interval_s: float = 0.25
    base_threads: int = 0
    thread_templates: Mapping[int, Mapping[Role, PoolSpec]] = field(default_factory=dict)

    def template(self, role: Role, threads: int) -> PoolSpec:
        """The pool spec of a ``role`` worker computing with ``threads`` threads."""
        return self.thread_templates.get(threads, {}).get(role) or self.templates[role]

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.window_s <= 0 or self.sync_interval_s <= 0:
            raise ValueError("the interval, the window and the sync interval must be > 0")
        if self.start_s < 0 or self.flip_s < 0:
            raise ValueError("start and flip times must be ≥ 0")
        missing = [r.value for r in Role if r not in self.templates]
        if missing:
            raise ValueError(f"no pool spec to start {', '.join(missing)} workers from")


@dataclass
class PlannedResult(SimResult):
    """A :class:`SimResult` with the planner's decisions (``Decision.as_dict()``, with the board's
    ``measured_after``) and the pool sizes over time (``pools``: one entry per change)."""

    planner: list[dict[str, Any]] = field(default_factory=list)
    pools: list[dict[str, Any]] = field(default_factory=list)


class PlannedSimulator(Simulator):
    """A :class:`Simulator` whose shape the SLO planner changes (see the module docstring)."""

    def __init__(self, config: SimConfig, elastic: ElasticConfig, record_steps: bool = False) -> None:
        super().__init__(config, record_steps)
        self.elastic = elastic
        self.state = PlannerState()
        self.admission = Admission(None, is_draining=lambda: False)
        self.board = PlannerBoard(self.admission)
        stand_in = DispatcherStandIn(self.router.registry, SimChannel(self))  # all Deployment uses of one
        self.deployment = Deployment(stand_in, clock=lambda: self.now_s)  # type: ignore[arg-type]
        self.history: list[dict[str, Any]] = []
        self.decisions: list[Decision] = []
        self.pools: list[dict[str, Any]] = []
        self.processes: dict[str, SimProcess] = {}
        self.retired: list[SimWorker] = []
        self._tickets: dict[str, Ticket] = {}
        self.ends: list[tuple[float, str]] = []  # (when the router saw it end, request id)
        self._prefill_start: dict[str, float] = {}
        self.prefill_times: dict[str, float] = {}  # each prompt's prefill, as the worker times it
        targets = {role.value: len(ws) for role, ws in self.workers.items()}
        sup = SupervisorConfig(targets=targets, launcher="sim", sync_interval_s=elastic.sync_interval_s)
        self.supervisor = Supervisor(sup, SimBackend(self), lambda wid, role, _: WorkerSpec(wid, role, []),
                                     link=lambda _url, body: self.deployment.sync(body))
        for w in self.by_id.values():
            w.threads = elastic.base_threads
        self._launching = True
        self.supervisor.launch(0.0)  # slots for the workers that are up at the start
        self._launching = False

    # -- the run -------------------------------------------------------------------------------

    def run(self, requests: list[SimRequest]) -> PlannedResult:  # type: ignore[override]
        """Simulate the requests with the planner and the supervisor running beside the router."""
        self.at(0.0, self._sync, background=True)
        self.at(self.elastic.interval_s, self._plan, background=True)
        result = super().run(requests)
        for w in self.retired:  # workers that left (or flipped: their old self) count too
            result.num_steps += w.num_steps
            result.num_preemptions += w.scheduler.num_preemptions
            busy = result.busy_s_by_worker
            busy[w.worker_id] = busy.get(w.worker_id, 0.0) + w.busy_s
        return PlannedResult(**vars(result), planner=self.history, pools=self.pools)

    def _sync(self) -> None:
        """A supervisor pass (and a look at who finished draining)."""
        if self.idle:
            return
        for proc in list(self.processes.values()):
            self.check_drained(proc)
        self.supervisor.step(self.now_s)
        self._record_pools()
        self.at(self.now_s + self.elastic.sync_interval_s, self._sync, background=True)

    def _plan(self) -> None:
        """One planner interval: signals, decide, scale, report (``PlannerRunner.step``)."""
        if self.idle:
            return
        d = decide(self.signals(), self.state, self.elastic.planner)
        if d.changes:
            try:
                self.deployment.scale(d.target.targets())
            except APIError:
                self.state.pending = None
        limit = shed_limit(d, self.elastic.planner.attainment_target)
        self.board.report({"decision": d.as_dict(), "shed_above_inflight": limit})
        self.history.append(self.board.history[-1])  # the board's copy: it gets ``measured_after``
        self.decisions.append(d)
        self.at(self.now_s + self.elastic.interval_s, self._plan, background=True)

    def _record_pools(self) -> None:
        reg = self.router.registry
        states: dict[str, int] = {}
        for slot in self.supervisor.slots:
            states[slot.state] = states.get(slot.state, 0) + 1
        entry = {
            "ready": {r.value: len(reg.by_role(r)) for r in Role},
            "target": dict(self.deployment.targets or {}),
            "slots": dict(sorted(states.items())),
        }
        if not self.pools or any(self.pools[-1][k] != v for k, v in entry.items()):
            self.pools.append({"t_s": round(self.now_s, 6), **entry})

    # -- what the planner reads -----------------------------------------------------------------

    def signals(self) -> Signals:
        """What the router's three answers would give the planner now (:mod:`pdserve.sim.elastic_signals`)."""
        return planner_signals(self)

    @property
    def records(self) -> dict[str, RequestRecord]:
        """Every request's record so far, by request id."""
        return self._records

    # -- requests: admission, 503, timing --------------------------------------------------------

    def _arrive(self, index: int, req: SimRequest) -> None:
        rid = f"sim-{index}"
        try:
            self._tickets[rid] = self.admission.admit(1)
        except APIError as exc:  # shed early: refused before the router traces it
            self._records[rid] = RequestRecord(
                index=index, scheduled_s=req.arrival_s, sent_s=req.arrival_s, max_tokens=req.max_tokens,
                num_prompt_tokens=len(req.prompt_token_ids), error_type=f"http_{exc.status}",
                error=exc.message)
            return
        super()._arrive(index, req)

    def _route(self, rid: str, req: SimRequest) -> None:
        super()._route(rid, req)
        if rid not in self.router.routes:  # no worker takes new requests: the dispatcher's 503
            rec = self._records[rid]
            rec.error_type, rec.error = "http_503", "no workers are available to serve the request"
            self._ended(rid, self.now_s)

    def _finish(self, rid: str, t_s: float) -> None:
        super()._finish(rid, t_s)
        self._ended(rid, t_s)

    def _ended(self, rid: str, t_s: float) -> None:
        ticket = self._tickets.pop(rid, None)
        if ticket is not None:
            ticket.release()
        self.ends.append((t_s, rid))

    def _kick(self, worker: SimWorker) -> None:
        super()._kick(worker)
        if worker.busy:  # the step just begun: when each prompt's computing started (its timing)
            for item in worker.current.scheduled:
                if item.num_computed_tokens < item.request.num_prompt_tokens:
                    self._prefill_start.setdefault(item.request.request_id, self.now_s)

    def _emit(self, rid: str, t_s: float, request: Request) -> None:
        if self._records[rid].ttft_s is None and rid in self._prefill_start:
            self.prefill_times[rid] = max(t_s - self.config.hop_s - self._prefill_start.pop(rid), 0.0)
        super()._emit(rid, t_s, request)

    # -- processes -------------------------------------------------------------------------------

    def start_process(self, worker_id: str, role: str, threads: int = 0) -> SimProcess:
        """The backend starts a worker: up at once at launch, else ``start_s`` later."""
        proc = SimProcess(self, worker_id, role)
        proc.threads = threads or self.elastic.base_threads
        self.processes[worker_id] = proc
        if self._launching and worker_id in self.by_id:
            proc.up = True
        else:
            self.at(self.now_s + self.elastic.start_s, lambda: self._register(proc), background=True)
        return proc

    def _register(self, proc: SimProcess) -> None:
        if proc.exit_code is not None or self.processes.get(proc.name) is not proc:
            return  # stopped before it was up
        self._add_worker(proc.name, Role(proc.role), proc.threads)
        proc.up = True

    def _add_worker(self, worker_id: str, role: Role, threads: int) -> SimWorker:
        pool = self.elastic.template(role, threads)
        c = self.config
        w = SimWorker(worker_id, role, pool.scheduler or c.scheduler, pool.num_blocks, c.block_size,
                      c.enable_prefix_caching, c.max_model_len, pool.step_model, pool.co_location, pool.host)
        w.threads = threads
        self.workers.setdefault(role, []).append(w)
        self.by_id[worker_id] = w
        if pool.link is not None:
            self.links[worker_id] = Link(pool.link)
        self._inbox.setdefault(worker_id, [])
        self.router.register(w, role is Role.DECODE or (role is Role.MIXED and worker_id in self.links))
        self.router.start_heartbeats([w])
        return w

    def _retire(self, worker_id: str) -> None:
        w = self.by_id.pop(worker_id, None)
        if w is not None:
            self.workers[w.role].remove(w)
            self.retired.append(w)
        self.links.pop(worker_id, None)
        self.router.remove(worker_id)

    def flip(self, worker_id: str, role: str) -> None:
        """The router sent ``Flip``: the worker gets it one hop later and drains to change role."""
        proc, w = self.processes.get(worker_id), self.by_id.get(worker_id)
        if proc is None or w is None:
            return

        def receive() -> None:
            if proc.exit_code is None and not proc.stopping and proc.flip_to is None:
                proc.flip_to = role
        self.deliver(w, self.now_s + self.config.hop_s, receive)

    def set_threads(self, worker_id: str, threads: int) -> None:
        """The router sent ``SetThreads``: one hop later, between its steps, the worker computes with
        the step model of that thread count (a count without a profile keeps its model)."""
        proc, w = self.processes.get(worker_id), self.by_id.get(worker_id)
        if proc is None or w is None or threads < 1:
            return

        def receive() -> None:
            if self.by_id.get(worker_id) is not w:
                return  # it left or flipped meanwhile (a flip keeps the process's threads)
            pool = self.elastic.template(w.role, threads)
            w.step_model, w.co_location, w.threads = pool.step_model, pool.co_location, threads
            proc.threads = threads
        self.deliver(w, self.now_s + self.config.hop_s, receive)

    def drained(self, worker_id: str) -> bool:
        """The worker has nothing left: no request, no reservation, no KV held, none in flight."""
        w = self.by_id.get(worker_id)
        if w is None:
            return True
        s, info = w.scheduler, self.router.registry.get(worker_id)
        return (not w.busy and not s.has_unfinished_requests() and not s.held and not w.pending
                and not self._inbox[worker_id] and (info is None or info.num_inflight == 0))

    def check_drained(self, proc: SimProcess) -> None:
        """A draining process that has finished: it exits, or (a flip) comes back in its new role."""
        if proc.exit_code is not None or not proc.up or not self.drained(proc.name):
            return
        if proc.stopping:
            proc.exit_code = 0
            self.leave(proc)
        elif proc.flip_to is not None and proc.flip_done_at is None:
            proc.flip_done_at = self.now_s + self.elastic.flip_s
            self.at(proc.flip_done_at, lambda: self._flipped(proc), background=True)

    def _flipped(self, proc: SimProcess) -> None:
        if proc.exit_code is not None or proc.flip_to is None:
            return
        role, proc.flip_to, proc.flip_done_at = proc.flip_to, None, None
        self._retire(proc.name)  # a fresh cache, a new epoch: the router drops the old entries
        proc.role = role
        self._add_worker(proc.name, Role(role), proc.threads)

    def leave(self, proc: SimProcess) -> None:
        """The process exited: the router forgets the worker."""
        self._retire(proc.name)

