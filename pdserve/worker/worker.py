"""A worker process: one engine of one role, driven by messages from the router.

Lifecycle:

1. Start: load the model, allocate the KV cache (a decode worker allocates it
   through its KV receiver so prefill workers can write into it), connect to
   the router and ``Register`` (with the KV descriptor, for decode workers).
2. Loop: read every pending control message, collect KV arrivals (decode),
   run one engine step when there is work, report tokens, heartbeat.
3. SIGTERM or SIGINT: tell the router it is draining (it stops sending new
   requests), finish the requests it has (up to ``drain_timeout_s``), then
   close sockets and free shared memory. A second signal or ``Shutdown``
   stops at once.

The role decides what the messages mean (see ``protocol``): a prefill worker
pushes KV through a :class:`KVPusher`, a decode worker takes it in through a
:class:`KVIntake`, a mixed worker generates whole requests by itself and has
both: a ``PrefillRequest`` naming a decode worker is computed and pushed
there, a ``DecodeRequest`` reserves blocks for KV another worker computes.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from types import FrameType

import torch
import zmq

from pdserve.block_hash import HASH_SCHEME
from pdserve.config import Role
from pdserve.engine.engine import RequestOutput
from pdserve.errors import PDServeError
from pdserve.transfer.base import KVReceiver, KVSender, host_id
from pdserve.worker import protocol as p
from pdserve.worker.config import WorkerConfig
from pdserve.worker.decode import KVIntake
from pdserve.worker.kv_events import KVEventPublisher
from pdserve.worker.prefill import KVPusher
from pdserve.worker.reports import tokens_message, worker_load, worker_stats
from pdserve.worker.roles import RoleParts, build_role
from pdserve.worker.step_log import StepLog
from pdserve.worker.timing import PrefillTimer

logger = logging.getLogger(__name__)


class Worker:
    """Runs an engine for the router until told to stop."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.role = config.role
        self.worker_id = config.worker_id or f"{self.role.value}-{socket.gethostname()}-{os.getpid()}"
        self.step_log: StepLog | None = None
        self._use(build_role(config, config.role))
        self.refused: str | None = None
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.IDENTITY, self.worker_id.encode())
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        self._sock.connect(config.router)
        self._stop = False
        self._draining = False
        self._flip_to: Role | None = None  # draining to change role, not to exit
        self._drain_deadline_s = 0.0
        self._next_heartbeat_s = 0.0
        self._held_since_s: dict[str, float] = {}
        self.metrics_port = 0

    def _use(self, parts: RoleParts) -> None:
        """Serve with these role parts (at start, and after a role flip)."""
        self.parts = parts
        self.role = parts.role
        self.engine = parts.engine
        self.receiver: KVReceiver | None = parts.receiver
        self.sender: KVSender | None = parts.sender
        self.intake: KVIntake | None = parts.intake
        self.pusher: KVPusher | None = parts.pusher
        self.timer = PrefillTimer(self.pusher)
        if self.step_log is not None:
            self.step_log.close()  # a flip: a fresh log around the new role's timer
        self.step_log = StepLog.from_env(self.timer, self.worker_id)  # PDSERVE_STEP_LOG (step_log.py)
        # A fresh cache after a flip: a new epoch tells the router's index to drop the old entries.
        self.kv_events = KVEventPublisher(self.engine.block_manager, self.worker_id)

    # -- messaging ---------------------------------------------------------------------

    def send(self, message: p.Message) -> None:
        """Send one message to the router."""
        self._sock.send(p.encode(message), copy=False)

    def register(self) -> None:
        """Announce this worker to the router."""
        runner = self.engine.runner
        self.send(
            p.Register(
                worker_id=self.worker_id,
                role=self.role.value,
                model=self.config.engine.model.model,
                pid=os.getpid(),
                host_id=host_id(),
                max_model_len=self.engine.max_model_len,
                block_size=runner.block_size,
                num_blocks=runner.num_blocks,
                kv=self.receiver.descriptor() if self.receiver is not None else None,
                metrics_port=self.metrics_port,
                secret=self.config.secret,
                hash_scheme=HASH_SCHEME,
                prefix_caching=self.engine.config.cache.enable_prefix_caching,
                kv_epoch=self.kv_events.epoch,
                threads=torch.get_num_threads(),
            )
        )

    def load(self) -> p.WorkerLoad:
        """Current load, as heartbeats report it."""
        return worker_load(self.engine, self.intake)

    def stats(self) -> p.WorkerStats:
        """Counters for tests, metrics and ``pdserve status``."""
        return worker_stats(self.worker_id, self.role.value, self.load(), self.engine, self.sender,
                            self.receiver, self.intake, self.kv_events)

    # -- loop ----------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until stopped."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        if self.config.metrics_port is not None:
            from pdserve.worker.metrics import serve_metrics

            self.metrics_port = serve_metrics(self, self.config.metrics_port)
        self.register()
        logger.info("worker %s (%s) registered with %s", self.worker_id, self.role.value, self.config.router)
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        try:
            while not self._stop:
                sched = self.engine.scheduler
                if sched.running or sched.waiting:
                    timeout_ms = 0
                elif sched.waiting_for_kv or (self.intake and self.intake.num_pending):
                    timeout_ms = 1
                else:
                    timeout_ms = 10
                if poller.poll(timeout_ms):
                    self._drain_messages()
                if self.intake is not None:
                    self._take_kv()
                if self.engine.has_unfinished_requests():
                    self._step()
                self._publish_kv_events()
                now = time.monotonic()
                if self._draining and self._drained():
                    if self._flip_to is None:
                        break
                    self._finish_flip(self._flip_to)
                if now >= self._next_heartbeat_s:
                    if self._draining:
                        self.send(p.Draining(self.worker_id))
                    epoch, seq = self.kv_events.epoch, self.kv_events.seq
                    self.send(p.Heartbeat(self.worker_id, self.load(), epoch, seq))
                    self._next_heartbeat_s = now + self.config.heartbeat_interval_s
                    self._expire_leases(now)
        finally:
            self.close()
        if self.refused is not None:
            raise PDServeError(f"the router refused this worker: {self.refused}")

    def _publish_kv_events(self) -> None:
        data = self.kv_events.collect()
        if data is not None:
            self._sock.send(data, copy=False)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._flip_to is not None:  # a signal during a flip: drain and exit instead
            self._flip_to = None
            return
        if self._draining:  # a second signal: stop now
            self._stop = True
            return
        logger.info("worker %s: signal %d, draining", self.worker_id, signum)
        self._draining = True
        self._drain_deadline_s = time.monotonic() + self.config.drain_timeout_s

    def _begin_flip(self, role: str) -> None:
        """Drain (the router already routes nothing new here), then change role (``_finish_flip``)."""
        if self._draining:
            return  # shutting down (or flipping already)
        try:
            self._flip_to = Role(role)
        except ValueError:
            logger.warning("worker %s: flip to unknown role %r ignored", self.worker_id, role)
            return
        logger.info("worker %s: draining to flip %s -> %s", self.worker_id, self.role.value, role)
        self._flip_started_s = time.monotonic()
        self._draining = True
        self._drain_deadline_s = self._flip_started_s + self.config.drain_timeout_s
        self.send(p.Draining(self.worker_id))

    def _set_threads(self, n: int) -> None:
        """Compute with ``n`` torch threads from the next step on (heartbeats report them)."""
        if isinstance(n, bool) or n < 1:
            logger.warning("worker %s: SetThreads(%r) ignored (give 1 or more)", self.worker_id, n)
            return
        logger.info("worker %s: torch threads %d -> %d", self.worker_id, torch.get_num_threads(), n)
        torch.set_num_threads(n)

    def _finish_flip(self, role: Role) -> None:
        """Drained: rebuild engine and transfer side for ``role`` with the same weights; register."""
        old, model = self.parts, self.engine.runner.model
        old.close()
        self._held_since_s.clear()
        self._use(build_role(self.config, role, model))
        del old
        self._flip_to, self._draining = None, False
        self.register()
        logger.info("worker %s: now %s (flip took %.2f s)", self.worker_id, role.value,
                    time.monotonic() - self._flip_started_s)

    def _drained(self) -> bool:
        """Draining and nothing left to finish (or out of time)."""
        sched = self.engine.scheduler
        quarantined = self.intake.num_quarantined if self.intake else 0  # nothing left to serve there
        busy = bool(sched.running or sched.waiting or sched.held) or len(sched.waiting_for_kv) > quarantined
        if busy and time.monotonic() < self._drain_deadline_s:
            return False
        if busy:
            logger.warning("worker %s: drain timed out with requests left", self.worker_id)
        return True

    def _drain_messages(self) -> None:
        while True:
            try:
                data = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = p.decode(data)
            except Exception:
                logger.warning("worker %s: undecodable control message dropped", self.worker_id)
                continue
            self._handle(message)

    def _handle(self, message: p.Message) -> None:
        match message:
            case p.PrefillRequest():
                self._on_prefill(message)
            case p.DecodeRequest():
                self._on_decode(message)
            case p.Blocks(request_id=rid, block_ids=block_ids, num_cached_tokens=num_cached):
                if self.pusher is not None:
                    self.pusher.set_destination(rid, block_ids, num_cached)
                    self.engine.scheduler.open_gate(rid)
            case p.Release(request_id=rid):
                self._release(rid)
            case p.Abort(request_id=rid):
                self._abort(rid)
            case p.Ping():
                pass
            case p.PeerLost(worker_id=peer):
                if self.intake is not None:
                    self.intake.peer_lost(peer)
                if self.sender is not None:
                    self.sender.disconnect(peer)
            case p.GetStats():
                self.send(self.stats())
            case p.Registered():
                logger.debug("worker %s: registration confirmed", self.worker_id)
            case p.Reregister():
                self.register()
            case p.KVSnapshotRequest():
                self._publish_kv_events()  # the snapshot covers every batch sent before it
                self._sock.send(self.kv_events.snapshot(), copy=False)
            case p.RegisterRefused(reason=reason):
                logger.error("worker %s: the router refused it: %s", self.worker_id, reason)
                self.refused = reason
                self._stop = True
            case p.Shutdown():
                self._stop = True
            case p.Flip(role=role):
                self._begin_flip(role)
            case p.SetThreads(threads=n):
                self._set_threads(n)
            case _:
                logger.warning("worker %s: unexpected %s", self.worker_id, type(message).__name__)

    def _on_prefill(self, m: p.PrefillRequest) -> None:
        received_s = self.timer.clock()  # setting up (e.g. the first connection to a peer) is queueing
        try:
            if self._draining:
                raise PDServeError(f"worker {self.worker_id} is shutting down")
            request = self.engine.make_request(
                m.prompt_token_ids, m.params.to_params(), m.request_id, m.output_token_ids
            )
            if self.role is Role.PREFILL or m.decode_worker_id is not None:  # a hand-off
                if m.decode_worker_id is None or m.decode_kv is None:
                    raise PDServeError("a prefill worker needs a decode worker to hand the KV to")
                if self.pusher is None:
                    raise PDServeError(f"a {self.role.value} worker cannot hand KV to another worker")
                request.prefill_only = True  # (always so on a prefill worker)
                self.pusher.track(m.request_id, m.decode_worker_id, m.decode_kv)
            # A decode worker takes a whole request when the router prefills it here
            # (conditional disaggregation) or as the fallback; a mixed worker, its own requests.
            # A hand-off (prefill worker, or mixed worker computing for another) computes
            # nothing before the decode side reserved a home for the KV (``Blocks``).
            self.engine.enqueue(request, gated=request.prefill_only)
            self.timer.received(m.request_id, received_s, handoff=request.prefill_only)
        except (PDServeError, ValueError) as exc:
            if self.pusher is not None:
                self.pusher.forget(m.request_id)
            self.send(p.RequestFailed(m.request_id, str(exc), 503 if self._draining else 400))

    def _on_decode(self, m: p.DecodeRequest) -> None:
        try:
            if self._draining:
                raise PDServeError(f"worker {self.worker_id} is shutting down")
            if self.intake is None:
                raise PDServeError(f"a {self.role.value} worker cannot take KV from another worker")
            request = self.engine.make_request(
                m.prompt_token_ids, m.params.to_params(), m.request_id, m.output_token_ids
            )
            block_ids = self.intake.admit(request, m.prefill_worker_id)
        except (PDServeError, ValueError) as exc:
            self.send(p.RequestFailed(m.request_id, str(exc), 503 if self._draining else 400))
            return
        if block_ids is not None:
            self.send(p.Reserved(m.request_id, block_ids, request.num_computed_tokens))

    def _release(self, rid: str) -> None:
        self._held_since_s.pop(rid, None)
        self.engine.release(rid)
        if self.pusher is not None:
            self.pusher.forget(rid)

    def _expire_leases(self, now_s: float) -> None:
        """Free KV held for hand-offs the decode side never acknowledged."""
        for rid, since_s in list(self._held_since_s.items()):
            if now_s - since_s > self.config.kv_lease_s:
                logger.warning(
                    "worker %s: KV lease of %s expired unacknowledged; freeing it", self.worker_id, rid
                )
                if self.pusher is not None:
                    self.pusher.abort(rid)
                self._release(rid)

    def _abort(self, rid: str) -> None:
        self._held_since_s.pop(rid, None)
        self.timer.forget(rid)
        if self.pusher is not None and self.pusher.is_tracked(rid):  # this worker computes its KV for another
            self.pusher.abort(rid)
        elif self.intake is not None:  # its KV may still be arriving: the intake decides when to free it
            self.intake.abort(rid)
            return
        self.engine.abort_request(rid)

    def _take_kv(self) -> None:
        assert self.intake is not None
        for rid, block_ids, num_cached in self.intake.retry_pending():
            self.send(p.Reserved(rid, block_ids, num_cached))
        for arrival in self.intake.poll():
            out = arrival.output
            self.send(p.KVReceived(out.request_id, arrival.num_bytes, arrival.transfer_s))
            self._report(out)

    def _step(self) -> None:
        outputs = self.engine.step(hooks=self.step_log or self.timer)
        if self.step_log is not None:
            self.step_log.step_done()
        for out in outputs:
            if out.finish_reason == "prefilled" and self.pusher is not None:
                lp = out.logprobs[-1] if out.logprobs else None
                self.pusher.prefill_finished(out.request_id, out.new_token_ids[0], lp)
                self._held_since_s[out.request_id] = time.monotonic()
                timing = self.timer.finish(out.request_id, self.pusher.first_push_s(out.request_id))
                self._report(out, finished=False, timing=timing)
            else:
                self._report(out, timing=self.timer.finish(out.request_id))
        if self.pusher is not None:
            self.pusher.after_step()

    def _report(self, out: RequestOutput, finished: bool | None = None, timing: p.PrefillTiming | None = None
                ) -> None:
        self.send(tokens_message(out, finished, timing))

    def close(self) -> None:
        """Close sockets and free the KV transport's resources."""
        self.parts.close()
        if self.step_log is not None:
            self.step_log.close()
        self._sock.close(0)
        self._ctx.term()
