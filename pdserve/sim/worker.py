"""A simulated worker: the real scheduler and block manager, stepped in simulated time.

The engine's own step is schedule → execute → update. Here the same real
:class:`Scheduler` (over the same real :class:`BlockManager`) is stepped the
same way; only *execute* is replaced: a step's duration comes from a
:class:`StepModel`, and the sampled token is a placeholder id (requests run
with ``ignore_eos``, as ``pdserve bench`` sends them, so only ``max_tokens``
or the context limit ends them — exactly what the real engine does).

Lifecycle of one step (driven by :class:`pdserve.sim.simulator.Simulator`):

1. ``begin_step(now)``: ``Scheduler.schedule()``; the batch's duration from
   the step model — times the worker's co-location slowdown of the step's kind
   when the simulator says another worker of its host is in a step at that
   moment (``others_busy``); the worker is busy until ``now + duration``.
2. ``end_step()``: ``Scheduler.update()`` with one placeholder token per
   request that reached the end of its tokens; returns the requests that
   got a token or finished.

A decode worker's reservations that found no room wait in ``pending``
(as :class:`pdserve.worker.decode.KVIntake` queues them) and are retried,
first come first served, whenever blocks may have been freed.

What the router learns of the worker is what a real worker tells it: the
block manager records its prefix-cache events, batched by the real
:class:`KVEventPublisher` (``kv_events``), and ``load()`` is the heartbeat's
:class:`WorkerLoad` with the cumulative step counters the real engine keeps
(prompt tokens computed and time in steps that computed any; decode-only
steps, their time and their batch), from which the router learns its rates.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

from pdserve.block_hash import HASH_SCHEME
from pdserve.config import Role, SchedulerConfig
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.scheduler import Scheduler, SchedulerOutput
from pdserve.request import Request, TokenLogprobs
from pdserve.sim.colocation import CoLocation
from pdserve.sim.step_model import StepModel, step_shape
from pdserve.transfer.descriptor import KVDescriptor, KVLayout
from pdserve.worker import protocol as p
from pdserve.worker.kv_events import KVEventPublisher

#: The placeholder token a simulated step "samples" (requests ignore EOS, so its value is irrelevant).
SIM_TOKEN_ID = 1


@dataclass
class SimToken:
    """What the scheduler's ``update`` needs from a sampled token."""

    token_id: int = SIM_TOKEN_ID
    logprobs: TokenLogprobs | None = None


_TOKEN = SimToken()


@dataclass(frozen=True)
class StepRecord:
    """One step as the scheduler decided it (for fidelity tests and traces)."""

    worker_id: str
    start_s: float
    duration_s: float
    batch: tuple[tuple[str, int], ...]  # (request id, new tokens) in schedule order
    preempted_ids: tuple[str, ...]


class SimWorker:
    """One worker of a pool: a real scheduler + block manager and a step-time model."""

    def __init__(
        self,
        worker_id: str,
        role: Role,
        scheduler_config: SchedulerConfig,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool,
        max_model_len: int,
        step_model: StepModel,
        co_location: CoLocation | None = None,
        host: str = "local",
    ) -> None:
        self.worker_id = worker_id
        self.role = role
        self.max_model_len = max_model_len
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching, record_events=True)
        self.scheduler = Scheduler(replace(scheduler_config, role=role), self.block_manager, max_model_len)
        self.kv_events = KVEventPublisher(self.block_manager, worker_id)
        self.step_model = step_model
        self.co_location = co_location  # None: its steps never slow down for other workers
        self.host = host
        self.threads = 0  # torch threads its step model was measured at, as its heartbeat reports them
        self.pending: deque[Request] = deque()
        self.num_deferred = 0  # reservations that found no room (KVIntake.num_deferred)
        self.busy = False
        self.num_steps = 0
        self.busy_s = 0.0
        # the engine's cumulative counters (LLMEngine.step), reported in every heartbeat
        self.num_prefill_tokens = 0
        self.prefill_busy_s = 0.0
        self.num_prefill_steps = 0
        self.num_decode_steps = 0
        self.decode_busy_s = 0.0
        self.num_decode_seqs = 0
        self._out: SchedulerOutput | None = None

    # -- the step ----------------------------------------------------------------------

    def begin_step(self, now_s: float, records: list[StepRecord] | None = None,
                   others: str | None = None) -> float | None:
        """Schedule a step; returns its duration, or None when there is nothing to run.
        ``others``: the kind of step (``"prefill"``, ``"decode"``) another worker of its host is in now
        (its co-location slowdown applies; None: none is)."""
        assert not self.busy
        out = self.scheduler.schedule()
        if out.is_empty and not out.preempted_ids:
            return None
        duration_s = 0.0
        if not out.is_empty:
            shape = step_shape(out)
            duration_s = self.step_model.step_time_s(shape)
            if others is not None and self.co_location is not None:
                duration_s *= self.co_location.factor(shape, others)
        if records is not None:
            records.append(StepRecord(
                self.worker_id, now_s, duration_s,
                tuple((s.request.request_id, s.num_new_tokens) for s in out.scheduled),
                tuple(out.preempted_ids),
            ))
        self._out = out
        self.busy = True
        self.num_steps += 1
        self.busy_s += duration_s
        if not out.is_empty:  # counted as LLMEngine.step counts them
            num_prompt = out.num_prompt_tokens
            self.num_prefill_tokens += num_prompt
            if num_prompt:
                self.prefill_busy_s += duration_s
                self.num_prefill_steps += 1
            else:
                self.num_decode_steps += 1
                self.decode_busy_s += duration_s
                self.num_decode_seqs += len(out.scheduled)
        return duration_s

    @property
    def step_kind(self) -> str | None:
        """The kind of the step in progress (``"prefill"``: it computes prompt tokens; ``"decode"``);
        None between steps."""
        if not self.busy or self._out is None:
            return None
        return "prefill" if self._out.num_prompt_tokens else "decode"

    @property
    def current(self) -> SchedulerOutput:
        """The batch of the step in progress."""
        assert self._out is not None
        return self._out

    def end_step(self) -> list[Request]:
        """Record the step's results (the real ``Scheduler.update``)."""
        out = self.current
        self._out = None
        self.busy = False
        sampled = [_TOKEN if s.samples else None for s in out.scheduled]
        return self.scheduler.update(out, sampled)

    # -- decode side: reservations --------------------------------------------------------

    def admit_remote(self, request: Request) -> list[int] | None:
        """Reserve blocks for a request whose KV comes from a prefill worker (or queue it)."""
        if not self.pending:
            block_ids = self.scheduler.add_remote_request(request)
            if block_ids is not None:
                return block_ids
        self.pending.append(request)
        self.num_deferred += 1
        return None

    def retry_pending(self) -> list[Request]:
        """Reservations that fit now, first come first served."""
        done = []
        while self.pending and self.scheduler.add_remote_request(self.pending[0]) is not None:
            done.append(self.pending.popleft())
        return done

    # -- what the router hears -------------------------------------------------------------

    def register_message(self, kv: KVDescriptor | None = None) -> p.Register:
        """The registration a real worker of this shape sends (``kv``: its KV receiver's descriptor)."""
        bm = self.block_manager
        return p.Register(
            worker_id=self.worker_id, role=self.role.value, model="sim", pid=0, host_id="sim",
            max_model_len=self.max_model_len, block_size=bm.block_size, num_blocks=bm.num_blocks, kv=kv,
            hash_scheme=HASH_SCHEME, prefix_caching=bm.enable_prefix_caching, kv_epoch=self.kv_events.epoch,
        )

    def descriptor(self, num_layers: int, kv_bytes_per_token: int) -> KVDescriptor:
        """A stand-in for its KV receiver's descriptor: a layout of ``kv_bytes_per_token`` when it can
        be written as one (fp16, one KV head), else a nominal one."""
        per_head_dim = 2 * num_layers * 2  # K and V, every layer, 2 bytes
        head_dim = kv_bytes_per_token // per_head_dim if kv_bytes_per_token % per_head_dim == 0 else 0
        bm = self.block_manager
        layout = KVLayout(num_layers, bm.num_blocks, bm.block_size, 1, max(head_dim, 1), "float16")
        return KVDescriptor("sim", f"sim://{self.worker_id}", "sim", layout)

    def load(self) -> p.WorkerLoad:
        """The load a heartbeat reports (as :meth:`pdserve.worker.worker.Worker.load` builds it)."""
        s, stats = self.scheduler, self.block_manager.stats()
        return p.WorkerLoad(
            num_running=len(s.running), num_waiting=len(s.waiting) + len(self.pending),
            num_waiting_for_kv=len(s.waiting_for_kv), num_held=len(s.held),
            num_free_blocks=stats.num_free_blocks, num_total_blocks=stats.num_blocks,
            num_cached_blocks=stats.num_cached_blocks,
            num_prefill_tokens=self.num_prefill_tokens, prefill_busy_s=self.prefill_busy_s,
            num_prefill_steps=self.num_prefill_steps,
            num_decode_steps=self.num_decode_steps, decode_busy_s=self.decode_busy_s,
            num_decode_seqs=self.num_decode_seqs,
            prefix_query_tokens=stats.prefix_query_tokens, prefix_hit_tokens=stats.prefix_hit_tokens,
            num_deferred_reservations=self.num_deferred, num_gate_waits=s.num_gate_waits,
            num_prefix_waits=s.num_prefix_waits, threads=self.threads,
        )
