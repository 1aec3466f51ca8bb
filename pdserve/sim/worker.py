"""A simulated worker: the real scheduler and block manager, stepped in simulated time.

The engine's own step is schedule → execute → update. Here the same real
:class:`Scheduler` (over the same real :class:`BlockManager`) is stepped the
same way; only *execute* is replaced: a step's duration comes from a
:class:`StepModel`, and the sampled token is a placeholder id (requests run
with ``ignore_eos``, as ``pdserve bench`` sends them, so only ``max_tokens``
or the context limit ends them — exactly what the real engine does).

Lifecycle of one step (driven by :class:`pdserve.sim.simulator.Simulator`):

1. ``begin_step(now)``: ``Scheduler.schedule()``; the batch's duration from
   the step model; the worker is busy until ``now + duration``.
2. ``end_step()``: ``Scheduler.update()`` with one placeholder token per
   request that reached the end of its tokens; returns the requests that
   got a token or finished.

A decode worker's reservations that found no room wait in ``pending``
(as :class:`pdserve.worker.decode.KVIntake` queues them) and are retried,
first come first served, whenever blocks may have been freed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

from pdserve.config import Role, SchedulerConfig
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.scheduler import Scheduler, SchedulerOutput
from pdserve.request import Request, TokenLogprobs
from pdserve.router.registry import WorkerInfo
from pdserve.sim.step_model import StepModel, step_shape
from pdserve.worker.protocol import WorkerLoad

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
    ) -> None:
        self.worker_id = worker_id
        self.role = role
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(replace(scheduler_config, role=role), self.block_manager, max_model_len)
        self.step_model = step_model
        self.pending: deque[Request] = deque()
        self.busy = False
        self.num_steps = 0
        self.busy_s = 0.0
        self._out: SchedulerOutput | None = None
        self.info = WorkerInfo(worker_id, role, "sim", 0, "sim", max_model_len, block_size, num_blocks, None)
        self.refresh_load()

    # -- the step ----------------------------------------------------------------------

    def begin_step(self, now_s: float, records: list[StepRecord] | None = None) -> float | None:
        """Schedule a step; returns its duration, or None when there is nothing to run."""
        assert not self.busy
        out = self.scheduler.schedule()
        if out.is_empty and not out.preempted_ids:
            return None
        duration_s = self.step_model.step_time_s(step_shape(out)) if not out.is_empty else 0.0
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
        return duration_s

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
        changed = self.scheduler.update(out, sampled)
        self.refresh_load()
        return changed

    # -- decode side: reservations --------------------------------------------------------

    def admit_remote(self, request: Request) -> list[int] | None:
        """Reserve blocks for a request whose KV comes from a prefill worker (or queue it)."""
        if not self.pending:
            block_ids = self.scheduler.add_remote_request(request)
            if block_ids is not None:
                return block_ids
        self.pending.append(request)
        return None

    def retry_pending(self) -> list[Request]:
        """Reservations that fit now, first come first served."""
        done = []
        while self.pending and self.scheduler.add_remote_request(self.pending[0]) is not None:
            done.append(self.pending.popleft())
        return done

    def refresh_load(self) -> None:
        """The load a heartbeat would report (the router's policies read it)."""
        s = self.scheduler
        self.info.load = WorkerLoad(
            num_running=len(s.running), num_waiting=len(s.waiting) + len(self.pending),
            num_waiting_for_kv=len(s.waiting_for_kv), num_held=len(s.held),
            num_free_blocks=self.block_manager.num_free_blocks,
            num_total_blocks=self.block_manager.num_blocks,
        )
