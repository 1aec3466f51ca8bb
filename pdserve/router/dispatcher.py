"""Sends requests to workers and turns their messages back into token streams.

Lifecycle of one request in the router:

1. ``generate`` picks the workers: a prefill worker P and a decode worker D
   (disaggregated), or one mixed worker (aggregated). P and D are told at
   the same moment: ``DecodeRequest`` to D, ``PrefillRequest`` to P.
2. The receive loop relays the hand-off: D's ``Reserved`` becomes ``Blocks``
   for P, D's ``KVReceived`` becomes ``Release`` for P.
3. ``Tokens`` from P (the first token) and D (the rest) are de-duplicated by
   their index in the output and queued to the request's stream.
4. The stream ends when a message says ``finished``; an early exit (client
   gone, stop string matched) sends ``Abort`` to every worker involved.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from pdserve.config import Role
from pdserve.request import TokenLogprobs
from pdserve.router.backend import BackendError, GenerationEvent
from pdserve.router.policy import RoutingPolicy, make_policy
from pdserve.router.registry import Registry, WorkerInfo
from pdserve.sampling_params import SamplingParams
from pdserve.worker import protocol as p

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DispatcherConfig:
    """Router-side dispatch settings.

    Attributes:
        bind: control endpoint workers connect to, ``tcp://HOST:PORT``.
        policy: routing policy name (``round_robin``, ``least_loaded``).
        lease_s: a worker silent for this long is removed.
        secret: workers must present it to register ("" accepts any).
    """

    bind: str = "tcp://127.0.0.1:0"
    policy: str = "least_loaded"
    lease_s: float = 3.0
    secret: str = field(default="", repr=False)


@dataclass
class _Inflight:
    request_id: str
    queue: asyncio.Queue[GenerationEvent | BackendError]
    workers: list[WorkerInfo]
    prefill_id: str | None
    num_tokens: int = 0
    finished: bool = False
    kv_bytes: int = 0
    kv_transfer_s: float = 0.0


class Dispatcher:
    """The router's backend: registry, routing and the worker message loop."""

    def __init__(self, config: DispatcherConfig, model_name: str, max_model_len: int) -> None:
        self.config = config
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.registry = Registry(config.lease_s)
        self.prefill_policy: RoutingPolicy = make_policy(config.policy)
        self.decode_policy: RoutingPolicy = make_policy(config.policy)
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._inflight: dict[str, _Inflight] = {}
        self._stats_waiters: dict[str, list[asyncio.Future[p.WorkerStats]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._ids = itertools.count()
        self.endpoint = ""
        self.num_kv_bytes = 0

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the control socket and start the receive and lease loops."""
        self._sock.bind(self.config.bind)
        self.endpoint = str(self._sock.getsockopt_string(zmq.LAST_ENDPOINT))
        self._tasks = [asyncio.create_task(self._recv_loop()), asyncio.create_task(self._lease_loop())]
        logger.info("router control endpoint %s", self.endpoint)

    async def stop(self) -> None:
        """Stop the loops and close the socket."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._sock.close(0)
        self._ctx.term()

    def is_ready(self) -> bool:
        """True when a prefill+decode pair or a mixed worker is registered."""
        return self.registry.ready

    # -- Backend ---------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationEvent]:
        """Dispatch a request and yield its new tokens as they arrive."""
        state = self._dispatch(request_id, prompt_token_ids, params)
        try:
            while True:
                event = await state.queue.get()
                if isinstance(event, BackendError):
                    raise event
                yield event
                if event.finished:
                    return
        finally:
            self._finish(state, abort=not state.finished)

    async def abort(self, request_id: str) -> None:
        """Stop a request on every worker it touches."""
        state = self._inflight.get(request_id)
        if state is not None:
            self._finish(state, abort=True)

    def _dispatch(self, rid: str, prompt: list[int], params: SamplingParams) -> _Inflight:
        if rid in self._inflight:
            raise BackendError(f"request id {rid} is already in flight", status=400)
        wire = p.WireSamplingParams.from_params(params)
        n = len(prompt)
        reg = self.registry
        if reg.disaggregated_ready:
            prefill = self.prefill_policy.pick(reg.by_role(Role.PREFILL), n)
            decode = self.decode_policy.pick(reg.by_role(Role.DECODE), n)
            state = _Inflight(rid, asyncio.Queue(), [prefill, decode], prefill.worker_id)
            self._inflight[rid] = state
            self._send(decode.worker_id, p.DecodeRequest(rid, prompt, wire, prefill.worker_id))
            self._send(prefill.worker_id, p.PrefillRequest(rid, prompt, wire, decode.worker_id, decode.kv))
        elif mixed := reg.by_role(Role.MIXED):
            worker = self.decode_policy.pick(mixed, n)
            state = _Inflight(rid, asyncio.Queue(), [worker], None)
            self._inflight[rid] = state
            self._send(worker.worker_id, p.PrefillRequest(rid, prompt, wire))
        else:
            raise BackendError("no workers are available to serve the request", status=503, retry_after_s=1.0)
        for w in state.workers:
            w.num_inflight += 1
        return state

    def _finish(self, state: _Inflight, abort: bool) -> None:
        if self._inflight.pop(state.request_id, None) is None:
            return
        for w in state.workers:
            w.num_inflight -= 1
            if abort:
                self._send(w.worker_id, p.Abort(state.request_id))

    # -- worker messages ---------------------------------------------------------------

    def _send(self, worker_id: str, message: p.Message) -> None:
        try:
            self._sock.send_multipart([worker_id.encode(), p.encode(message)], copy=False)
        except zmq.ZMQError as exc:  # unknown or disconnected peer (ROUTER_MANDATORY)
            logger.warning("router: cannot reach worker %s: %s", worker_id, exc)

    async def _recv_loop(self) -> None:
        while True:
            ident, data = await self._sock.recv_multipart()
            try:
                message = p.decode(data)
            except Exception:
                logger.warning("router: undecodable message from %r dropped", ident)
                continue
            try:
                self._handle(ident.decode(), message)
            except Exception:
                logger.exception("router: error handling %s", type(message).__name__)

    def _handle(self, sender: str, message: p.Message) -> None:
        match message:
            case p.Tokens():
                self._on_tokens(message)
            case p.Heartbeat(worker_id=wid, load=load):
                if not self.registry.heartbeat(wid, load):
                    logger.info("router: heartbeat from unknown worker %s; asking it to register", wid)
                    self._send(sender, p.Reregister())
            case p.Reserved(request_id=rid, block_ids=block_ids):
                state = self._inflight.get(rid)
                if state is not None and state.prefill_id is not None:
                    self._send(state.prefill_id, p.Blocks(rid, block_ids))
            case p.KVReceived(request_id=rid, num_bytes=num_bytes, transfer_s=transfer_s):
                self.num_kv_bytes += num_bytes
                state = self._inflight.get(rid)
                if state is not None and state.prefill_id is not None:
                    state.kv_bytes, state.kv_transfer_s = num_bytes, transfer_s
                    self._send(state.prefill_id, p.Release(rid))
            case p.RequestFailed(request_id=rid, message=text, code=code):
                state = self._inflight.get(rid)
                if state is not None:
                    state.queue.put_nowait(BackendError(text, status=code))
            case p.Register():
                self._on_register(sender, message)
            case p.WorkerStats(worker_id=wid):
                for fut in self._stats_waiters.pop(wid, []):
                    if not fut.done():
                        fut.set_result(message)
            case _:
                logger.warning("router: unexpected %s from %s", type(message).__name__, sender)

    def _on_register(self, sender: str, m: p.Register) -> None:
        if self.config.secret and m.secret != self.config.secret:
            logger.warning("router: registration of %s refused: wrong cluster secret", m.worker_id)
            return
        if m.model != self.model_name:
            logger.warning("router: %s serves %s, not %s; refused", m.worker_id, m.model, self.model_name)
            return
        self.registry.add(WorkerInfo.from_register(m))
        self._send(sender, p.Registered(m.worker_id, self.config.lease_s / 6))
        logger.info("router: %s worker %s registered (pid %d)", m.role, m.worker_id, m.pid)

    def _on_tokens(self, m: p.Tokens) -> None:
        state = self._inflight.get(m.request_id)
        if state is None:
            return
        skip = state.num_tokens - m.start  # tokens of this message already delivered
        if skip < 0:
            logger.warning(
                "router: gap in tokens of %s (have %d, got start %d)", m.request_id, state.num_tokens, m.start
            )
            skip = 0
        new_ids = m.token_ids[skip:]
        if not new_ids and not m.finished:
            return
        state.num_tokens += len(new_ids)
        logprobs = None
        if m.logprobs is not None:
            logprobs = [TokenLogprobs(t, lp, dict(top)) for t, lp, top in m.logprobs[skip:]]
        if m.finished:
            state.finished = True
        state.queue.put_nowait(
            GenerationEvent(
                token_ids=new_ids,
                logprobs=logprobs,
                finished=m.finished,
                finish_reason=m.finish_reason,
                stop_reason=m.stop_reason if isinstance(m.stop_reason, int) else None,
                num_prompt_tokens=m.num_prompt_tokens,
                num_cached_tokens=m.num_cached_tokens,
            )
        )

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.lease_s / 4)
            for dead in self.registry.expire():
                logger.warning("router: worker %s missed its heartbeat lease; removed", dead.worker_id)
                for state in list(self._inflight.values()):
                    if any(w.worker_id == dead.worker_id for w in state.workers):
                        state.queue.put_nowait(
                            BackendError(f"worker {dead.worker_id} stopped responding", status=503)
                        )

    # -- admin ------------------------------------------------------------------------------

    async def worker_stats(self, timeout_s: float = 2.0) -> list[p.WorkerStats]:
        """Ask every registered worker for its counters."""
        loop = asyncio.get_running_loop()
        futures = []
        for w in self.registry.all():
            fut: asyncio.Future[p.WorkerStats] = loop.create_future()
            self._stats_waiters.setdefault(w.worker_id, []).append(fut)
            futures.append(fut)
            self._send(w.worker_id, p.GetStats())
        if not futures:
            return []
        done, _ = await asyncio.wait(futures, timeout=timeout_s)
        return [f.result() for f in futures if f in done]

    def new_request_id(self) -> str:
        """A router-unique request id."""
        return f"r{int(time.time() * 1000) % 10**9}-{next(self._ids)}"
