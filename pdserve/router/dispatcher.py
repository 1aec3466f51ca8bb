"""Sends requests to workers, relays the hand-off, and recovers from failures.

Lifecycle of one request in the router (see ``inflight`` for its stages):

1. ``generate`` places an attempt: a prefill worker P and a decode worker D
   told at the same moment (``DecodeRequest`` to D, ``PrefillRequest`` to P);
   or one mixed worker; or, with no prefill worker left, the decode worker
   prefills by itself (``prefill_fallback``).
2. The receive loop relays the hand-off (D's ``Reserved`` → P's ``Blocks``,
   D's ``KVReceived`` → P's ``Release``) and queues new tokens, de-duplicated
   by their index in the output; messages of abandoned attempts are dropped.
3. The watch loop probes every worker (``Ping``: a dead process is noticed
   at once), expires silent ones, and enforces stage deadlines. A request
   that lost a worker, or whose KV transfer missed its deadline, gets a new
   attempt resuming from the tokens already delivered (``retry``), is
   prefilled on its decode worker (``recompute``), or fails with an error
   the client sees (``fail``, or after ``max_attempts``).
4. The stream ends with a ``finished`` message; an early exit (client gone,
   stop string) sends ``Abort`` to every worker of the current attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from pdserve.config import Role
from pdserve.router.backend import BackendError, GenerationEvent
from pdserve.router.channel import WorkerChannel
from pdserve.router.dispatch_config import DispatchCounters, DispatcherConfig
from pdserve.router.inflight import Inflight, Stage
from pdserve.router.membership import Membership
from pdserve.router.metrics import RouterMetrics
from pdserve.router.placement import Placer, local_candidates, prefill_candidates
from pdserve.router.registry import Registry, WorkerInfo
from pdserve.router.stats_requests import StatsRequests
from pdserve.router.tracing import RequestTrace
from pdserve.router.worker_perf import compute_overlap_s
from pdserve.sampling_params import SamplingParams
from pdserve.worker import protocol as p

logger = logging.getLogger(__name__)


class Dispatcher:
    """The router's backend: registry, routing, hand-off relay and recovery."""

    def __init__(self, config: DispatcherConfig, model_name: str, max_model_len: int) -> None:
        self.config = config
        self.model_name = model_name
        self._max_model_len = max_model_len
        self.registry = Registry(config.lease_s)
        self.counters = DispatchCounters()
        self.metrics = RouterMetrics()
        self.metrics.attach(self)
        self.channel = WorkerChannel(self._handle, lambda wid: self._worker_lost(wid, "connection gone"))
        self.placer = Placer(config, self.registry, self.channel.send)
        self.membership = Membership(config, model_name, self.registry, self.placer, self.channel.send)
        self._inflight: dict[str, Inflight] = {}
        self._by_worker_rid: dict[str, Inflight] = {}
        self.stats_requests = StatsRequests(self.channel.send)
        self._tasks: list[asyncio.Task[None]] = []
        self.endpoint = ""

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the control socket and start the receive and watch loops."""
        self.endpoint = self.channel.bind(self.config.bind)
        self._tasks = [asyncio.create_task(self.channel.run()), asyncio.create_task(self._watch_loop())]
        logger.info("router control endpoint %s", self.endpoint)

    async def stop(self) -> None:
        """Stop the loops and close the socket."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.channel.close()

    def is_ready(self) -> bool:
        """True when a prefill+decode pair or a mixed worker is registered."""
        return self.registry.ready

    @property
    def max_model_len(self) -> int:
        """The context limit: the router's, or less where a registered worker's KV cache holds less."""
        return min([self._max_model_len, *(w.max_model_len for w in self.registry.all())])

    @property
    def num_inflight(self) -> int:
        """Requests dispatched and not finished."""
        return len(self._inflight)

    # -- Backend ---------------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        trace: RequestTrace | None = None,
    ) -> AsyncIterator[GenerationEvent]:
        """Dispatch a request and yield its new tokens as they arrive."""
        if request_id in self._inflight:
            raise BackendError(f"request id {request_id} is already in flight", status=400)
        state = Inflight(
            request_id,
            list(prompt_token_ids),
            p.WireSamplingParams.from_params(params),
            trace=trace if trace is not None else RequestTrace(request_id),
        )
        if not self._place(state):
            self.metrics.requests.labels("rejected").inc()
            raise BackendError("no workers are available to serve the request", status=503, retry_after_s=1.0)
        self._inflight[request_id] = state
        outcome, last_s = "aborted", state.created_s
        try:
            while True:
                event = await state.queue.get()
                if isinstance(event, BackendError):
                    outcome = "error"
                    raise event
                now = time.monotonic()
                if event.token_ids:
                    if state.tokens_seen:
                        self.metrics.itl.observe(now - last_s)
                    state.tokens_seen, last_s = True, now
                if event.finished:
                    outcome = "finished"  # set first: the consumer may stop at this event
                yield event
                if event.finished:
                    return
        finally:
            self._finish(state, abort=not state.finished)
            m = self.metrics
            m.requests.labels(outcome).inc()
            m.prompt_tokens.inc(len(state.prompt))
            m.generation_tokens.inc(len(state.tokens))

    async def abort(self, request_id: str) -> None:
        """Stop a request on every worker it touches."""
        state = self._inflight.get(request_id)
        if state is not None:
            self._finish(state, abort=True)

    # -- placement and recovery ----------------------------------------------------------

    def _place(self, state: Inflight) -> bool:
        """Put the current attempt on workers; False when none can take it."""
        reg, n = self.registry, len(state.prompt) + len(state.tokens)

        def pool(role: Role) -> list[WorkerInfo]:
            workers = reg.by_role(role)
            fresh = [w for w in workers if w.worker_id not in state.excluded]
            return fresh or workers  # a worker that failed once is better than none

        pools = {role: pool(role) for role in Role}
        rid, params, outputs = state.worker_rid, state.params, list(state.tokens)
        local = local_candidates(pools, self.config.prefill_fallback)
        prefill = prefill_candidates(pools)  # prefill workers, and mixed ones
        placement = self.placer.place(state.prompt + outputs, params.max_tokens, prefill, local)
        if placement is None:
            return False
        dw = reg.get(placement.decode_id)
        pw = reg.get(placement.prefill_id) if placement.prefill_id is not None else None
        assert dw is not None
        computing = pw or dw
        state.prefill_charge = self.placer.charge(computing.worker_id, n - placement.num_cached_tokens)
        decision = {"reason": placement.reason, "predicted_cached_tokens": placement.num_cached_tokens}
        if pw is not None:
            state.prefill_id, state.decode_id = pw.worker_id, dw.worker_id
            # before the workers' clocks start
            state.trace.routed(state.attempt, pw.worker_id, dw.worker_id, decision)
            self.channel.send(dw.worker_id, p.DecodeRequest(rid, state.prompt, params, pw.worker_id, outputs))
            self.channel.send(
                pw.worker_id, p.PrefillRequest(rid, state.prompt, params, dw.worker_id, dw.kv, outputs)
            )
        else:
            if placement.reason == "no_prefill_worker":
                self.counters.num_fallback_prefills += 1
                logger.warning("router: no prefill worker; %s prefills %s itself", dw.worker_id, rid)
            state.prefill_id, state.decode_id = None, dw.worker_id
            state.trace.routed(state.attempt, None, dw.worker_id, decision)
            self.channel.send(
                dw.worker_id, p.PrefillRequest(rid, state.prompt, params, output_token_ids=outputs)
            )
        state.enter(Stage.PREFILL, self.config.prefill_timeout_s)
        self._by_worker_rid[rid] = state
        for wid in state.worker_ids:
            if (info := reg.get(wid)) is not None:
                info.num_inflight += 1
                self.metrics.routed.labels(info.role.value, wid).inc()
        return True

    def _abandon_attempt(self, state: Inflight) -> None:
        """Stop the current attempt on its workers (those still registered)."""
        self._by_worker_rid.pop(state.worker_rid, None)
        self.placer.credit(state.prefill_charge)
        state.prefill_charge = None
        for wid in state.worker_ids:
            info = self.registry.get(wid)
            if info is not None:
                info.num_inflight -= 1
                self.channel.send(wid, p.Abort(state.worker_rid))

    def _retry(self, state: Inflight, reason: str, suspects: set[str], local: bool = False) -> None:
        """A new attempt resuming from the delivered tokens, or an error if none is possible."""
        logger.warning("router: %s: %s", state.worker_rid, reason)
        old_decode = state.decode_id
        self._abandon_attempt(state)
        state.excluded |= suspects
        if state.attempt + 1 >= self.config.max_attempts:
            self._fail(state, f"request failed after {state.attempt + 1} attempts: {reason}")
            return
        state.attempt += 1
        self.counters.num_retries += 1
        if state.tokens:
            self.counters.num_migrations += 1
        decode = self.registry.get(old_decode) if old_decode else None
        if local and decode is not None:
            state.prefill_id, state.decode_id = None, decode.worker_id
            self.counters.num_fallback_prefills += 1
            rid = state.worker_rid
            state.trace.routed(state.attempt, None, decode.worker_id)
            self.channel.send(
                decode.worker_id,
                p.PrefillRequest(rid, state.prompt, state.params, output_token_ids=list(state.tokens)),
            )
            state.enter(Stage.PREFILL, self.config.prefill_timeout_s)
            self._by_worker_rid[rid] = state
            decode.num_inflight += 1
        elif not self._place(state):
            self._fail(state, f"no worker left to continue the request ({reason})")

    def _fail(self, state: Inflight, message: str) -> None:
        self.counters.num_failed += 1
        state.queue.put_nowait(BackendError(message, status=503, retry_after_s=1.0))

    def _finish(self, state: Inflight, abort: bool) -> None:
        if self._inflight.pop(state.request_id, None) is None:
            return
        self._by_worker_rid.pop(state.worker_rid, None)
        self.placer.credit(state.prefill_charge)
        state.prefill_charge = None
        for wid in state.worker_ids:
            info = self.registry.get(wid)
            if info is not None:
                info.num_inflight -= 1
                if abort:
                    self.channel.send(wid, p.Abort(state.worker_rid))

    def _worker_lost(self, worker_id: str, why: str) -> None:
        info = self.registry.remove(worker_id)
        if info is None:
            return
        self.placer.worker_removed(worker_id)
        if info.draining and not info.num_inflight:  # drained and gone: a clean leave
            logger.info("router: worker %s left after draining", worker_id)
        else:
            self.counters.num_workers_lost += 1
            logger.warning("router: worker %s removed: %s", worker_id, why)
        for state in list(self._by_worker_rid.values()):
            if worker_id in state.worker_ids:
                self._retry(state, f"worker {worker_id} lost ({why})", {worker_id})
        # Decode and mixed workers may hold blocks reserved for its KV: no more writes will come.
        self.membership.peer_lost(worker_id, (Role.DECODE, Role.MIXED))

    # -- worker messages ---------------------------------------------------------------

    def _handle(self, sender: str, message: p.Message) -> None:
        match message:
            case p.Tokens():
                self._on_tokens(sender, message)
            case p.Heartbeat(worker_id=wid, load=load):
                if not self.registry.heartbeat(wid, load):
                    self.channel.send(sender, p.Reregister())
                else:
                    self.placer.on_heartbeat(message)
            case p.KVEvents():
                self.placer.on_events(message)
            case p.KVSnapshot():
                self.placer.on_snapshot(message)
            case p.Reserved(request_id=rid, block_ids=block_ids, num_cached_tokens=num_cached):
                state = self._by_worker_rid.get(rid)
                if state is not None and state.prefill_id is not None:
                    self.channel.send(state.prefill_id, p.Blocks(rid, block_ids, num_cached))
                    state.trace.kv_reserved(len(block_ids))
            case p.KVReceived(request_id=rid, num_bytes=num_bytes, transfer_s=transfer_s):
                self.counters.kv_bytes += num_bytes
                self.metrics.kv_transfer.observe(transfer_s)
                state = self._by_worker_rid.get(rid)
                timing = state.trace.timing if state is not None else None
                self.placer.on_transfer(sender, num_bytes, transfer_s, compute_overlap_s(timing))
                if state is not None:
                    state.trace.kv_received(num_bytes, transfer_s)
                if state is not None and state.prefill_id is not None:
                    self.channel.send(state.prefill_id, p.Release(rid))
                    if state.stage is not Stage.DECODE:
                        state.enter(Stage.DECODE, self.config.token_timeout_s)
            case p.RequestFailed(request_id=rid, message=text, code=code):
                state = self._by_worker_rid.get(rid)
                if state is None:
                    return
                if code == 503:  # the worker is draining: try elsewhere
                    self._retry(state, text, {sender})
                else:
                    self._abandon_attempt(state)
                    state.queue.put_nowait(BackendError(text, status=code))
            case p.Draining(worker_id=wid):
                info = self.registry.get(wid)
                if info is not None and not info.draining:
                    info.draining = True
                    logger.info("router: worker %s is draining", wid)
            case p.Register():
                self.membership.on_register(sender, message)
            case p.WorkerStats():
                self.stats_requests.answer(message)
            case _:
                logger.warning("router: unexpected %s from %s", type(message).__name__, sender)

    def _on_tokens(self, sender: str, m: p.Tokens) -> None:
        state = self._by_worker_rid.get(m.request_id)
        if state is None:
            return  # an abandoned attempt
        new_ids = state.new_tokens(m)
        if state.prefill_charge is not None:
            self.placer.credit(state.prefill_charge)  # the prompt is computed
            state.prefill_charge = None
        if sender == state.prefill_id and state.stage is Stage.PREFILL:
            state.enter(Stage.TRANSFER, self.config.kv_timeout_s)
        elif sender == state.decode_id:
            state.enter(Stage.DECODE, self.config.token_timeout_s)
        if (new_ids and not state.tokens) or m.timing is not None:
            state.trace.first_token(sender, m.timing)
        if not new_ids and not m.finished:
            return
        state.deliver(m, new_ids)

    # -- watching --------------------------------------------------------------------------

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.probe_interval_s)
            self.check_workers()
            self.check_deadlines()
            self.placer.tick()

    def check_workers(self) -> None:
        """Probe every worker; remove the unreachable and the silent."""
        for w in self.registry.all():
            if not self.channel.send(w.worker_id, p.Ping()):
                self._worker_lost(w.worker_id, "connection gone")
        now = time.monotonic()
        for w in self.registry.all():
            if now - w.last_seen_s > self.config.lease_s:
                self._worker_lost(w.worker_id, f"no heartbeat for {self.config.lease_s:.1f} s")

    def check_deadlines(self) -> None:
        """Act on requests whose current stage ran past its deadline."""
        now = time.monotonic()
        for state in list(self._by_worker_rid.values()):
            if state.deadline_s is None or now < state.deadline_s:
                continue
            reason, suspects = state.overdue(self.config)
            policy = self.config.kv_failure_policy if state.stage is Stage.TRANSFER else "retry"
            if state.stage is Stage.TRANSFER:
                self.counters.num_kv_timeouts += 1
            if policy == "fail":
                self._abandon_attempt(state)
                self._fail(state, reason)
            else:
                self._retry(state, reason, suspects, local=policy == "recompute")

    # -- admin ------------------------------------------------------------------------------

    async def worker_stats(self, timeout_s: float = 2.0) -> list[p.WorkerStats]:
        """Ask every registered worker for its counters."""
        return await self.stats_requests.ask([w.worker_id for w in self.registry.all()], timeout_s)
