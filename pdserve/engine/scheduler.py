"""Decides, every step, which requests compute how many tokens.

One step:

1. ``schedule()``: running requests first, in admission order, each gets its
   next prompt chunk or one decode token; when blocks run out, the most
   recently admitted running request is preempted (its blocks are freed and
   it will be recomputed). Then waiting requests are admitted first-come
   first-served while the token budget, ``max_num_seqs`` and free blocks allow;
   one whose prefix a running request is computing may wait for it instead
   of computing it too (:mod:`pdserve.engine.prefix_wait`), and those behind
   it go first.
2. the model runner executes the ``SchedulerOutput``.
3. ``update()``: progress is recorded, sampled tokens are appended, token-level
   stop conditions are checked and finished requests give their blocks back.

Roles change step 3: a ``prefill`` scheduler ends a request after its first
token and *holds* its blocks (``FINISHED_PREFILLED``) until ``release``; a
``decode`` scheduler admits requests whose KV is written from outside
(``add_remote_request`` → ``WAITING_FOR_KV`` → ``finish_remote_kv``) and
prefills only when told to: a preempted request is recomputed locally (the
only way to go on), and ``add_request`` serves a request the router decided
to prefill here (conditional disaggregation: a short or mostly cached
prompt) or whose prefill could not be done elsewhere. Such a request then
decodes here like any other. A ``mixed`` scheduler serves whole requests and
takes both sides of hand-offs: remote requests as a decode scheduler does,
and ``prefill_only`` requests end and are held as on a prefill scheduler.

The prefill gate (rate matching between the pools): a prefill worker (or a
mixed worker computing a prompt for another) queues a
request *gated* (``add_request(..., gated=True)``) until its decode worker has
reserved blocks for the KV it will produce (``open_gate``), so no prompt is
computed without a home for its KV. A decode worker with no room defers its
reservation, which keeps the gate closed and the prefill worker's compute for
requests that have a home. ``num_gate_waits`` counts the requests that found
the gate closed at a step that had room to start them.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pdserve.config import Role, SchedulerConfig
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.prefix_wait import InflightPrefixes
from pdserve.request import Request, RequestStatus, TokenLogprobs

logger = logging.getLogger(__name__)


class Sampled(Protocol):
    """What the runner returns for a request that sampled a token."""

    token_id: int
    logprobs: TokenLogprobs | None


@dataclass
class ScheduledRequest:
    """One request's share of a step."""

    request: Request
    num_new_tokens: int
    block_ids: list[int]

    @property
    def num_computed_tokens(self) -> int:
        """Tokens already in the cache before this step."""
        return self.request.num_computed_tokens

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the request's tokens (a token is sampled)."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    """The batch of one step."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        """Tokens computed this step, over all requests."""
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt tokens computed this step (the rest are decode or recomputed output tokens)."""
        return sum(
            min(s.num_new_tokens, max(s.request.num_prompt_tokens - s.num_computed_tokens, 0))
            for s in self.scheduled
        )

    @property
    def is_empty(self) -> bool:
        """True when there is nothing to run."""
        return not self.scheduled


class Scheduler:
    """Continuous batching with chunked prefill, preemption by recompute and roles."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_model_len: int) -> None:
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.waiting_for_kv: dict[str, Request] = {}
        self.held: dict[str, Request] = {}
        self.gated: dict[str, Request] = {}
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_gate_waits = 0
        self.num_prefix_waits = 0  # requests that waited for a prefix another was computing
        self._prefix_waited: set[str] = set()
        self._gate_waited: set[str] = set()

    # -- admission ---------------------------------------------------------------

    def add_request(self, request: Request, gated: bool = False) -> None:
        """Queue a request to be prefilled here.

        A decode scheduler takes one when the router chose to prefill it here
        (conditional disaggregation), or as a fallback (no prefill worker is
        left, or its KV transfer failed and the policy is to recompute).
        ``gated``: not scheduled before ``open_gate`` (a prefill worker's
        request whose decode worker has not reserved its blocks yet).
        """
        self._register(request)
        request.status = RequestStatus.WAITING
        if gated:
            self.gated[request.request_id] = request
        else:
            self.waiting.append(request)

    def open_gate(self, request_id: str) -> bool:
        """The request's KV has a home: it may be scheduled (False: it was not gated)."""
        request = self.gated.pop(request_id, None)
        self._gate_waited.discard(request_id)
        if request is None:
            return False
        self.waiting.append(request)
        return True

    def add_remote_request(self, request: Request) -> list[int] | None:
        """Decode (or mixed) role: reserve blocks for a request whose KV another worker writes.

        Returns the reserved block ids (the prefill worker writes the prompt's
        KV into them), or None when there is no room now. Leading blocks this
        worker's prefix cache already holds (a previous turn it decoded) are
        shared, not reserved anew: ``request.num_computed_tokens`` says how
        many tokens they cover, and only the rest needs to be written.
        """
        if self.config.role is Role.PREFILL:
            raise RuntimeError("add_remote_request is for the decode and mixed roles")
        # Room for the KV of every token so far (prompt, and outputs of a migrated
        # request) and for the next token the prefill worker samples.
        reserved = self.block_manager.reserve_with_prefix(request, request.num_tokens + 1)
        if reserved is None:
            return None
        block_ids, num_cached = reserved
        request.num_computed_tokens = num_cached
        self._register(request)
        request.status = RequestStatus.WAITING_FOR_KV
        self.waiting_for_kv[request.request_id] = request
        return block_ids

    def finish_remote_kv(
        self, request_id: str, first_token_id: int, logprobs: TokenLogprobs | None = None
    ) -> Request:
        """Decode role: the prompt's KV is in place; join the running batch."""
        request = self.waiting_for_kv.pop(request_id)
        request.num_computed_tokens = request.num_tokens
        self.block_manager.cache_full_blocks(request)
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        self._append_and_check(request, first_token_id, logprobs)
        if request.finished:
            self._retire(request)
        return request

    def _register(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request

    # -- step --------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's batch (see the module docstring)."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = self._num_new_tokens(request, request.num_computed_tokens, budget)
            if num_new == 0:
                i += 1
                continue
            while not bm.allocate_slots(request, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted_ids.append(victim.request_id)
                if victim is request:
                    break
            else:
                out.scheduled.append(ScheduledRequest(request, num_new, bm.block_ids(request.request_id)))
                budget -= num_new
                i += 1
        if out.preempted_ids:
            return out
        if not self.config.enable_chunked_prefill:
            # Whole prompts: decodes do not eat the prompt budget, and a prompt longer
            # than the budget runs as the step's only prompt (never starved by decodes).
            budget = self.config.max_num_batched_tokens
        num_prompts = 0
        inflight = self._inflight_prefixes() if self.waiting else None
        passed: list[Request] = []  # waiting for a prefix a running request computes (prefix_wait.py)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if inflight is not None and inflight.should_wait(request):
                passed.append(self.waiting.popleft())
                if request.request_id not in self._prefix_waited:
                    self._prefix_waited.add(request.request_id)
                    self.num_prefix_waits += 1
                continue
            self._prefix_waited.discard(request.request_id)
            computed_blocks, num_cached = bm.get_computed_blocks(request)
            num_new = self._num_new_tokens(request, num_cached, budget, alone=num_prompts == 0)
            if num_new == 0 or not bm.allocate_slots(request, num_new, computed_blocks):
                break
            self.waiting.popleft()
            if inflight is not None:
                inflight.add(request, num_cached)
            request.num_computed_tokens = num_cached
            request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new, bm.block_ids(request.request_id)))
            budget -= num_new
            num_prompts += 1
        self.waiting.extendleft(reversed(passed))
        if self.gated and not self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            for rid in self.gated.keys() - self._gate_waited:  # they could have started now
                self._gate_waited.add(rid)
                self.num_gate_waits += 1
        return out

    def _inflight_prefixes(self) -> InflightPrefixes | None:
        """The prompt blocks the running requests are computing (None: no prefix cache)."""
        if not self.block_manager.enable_prefix_caching:
            return None
        config = self.config
        chunk = config.chunk_size if config.enable_chunked_prefill else config.max_num_batched_tokens
        inflight = InflightPrefixes(self.block_manager, chunk)
        for request in self.running:
            if request.num_computed_tokens < request.num_tokens - 1:
                inflight.add(request, request.num_computed_tokens)
        return inflight

    def _num_new_tokens(self, request: Request, num_computed: int, budget: int, alone: bool = False) -> int:
        remaining = request.num_tokens - num_computed
        if self.config.enable_chunked_prefill:
            return min(remaining, self.config.chunk_size, budget)
        # Without chunking a prompt runs whole; one longer than the budget runs alone.
        return remaining if remaining <= budget or alone else 0

    def update(self, out: SchedulerOutput, sampled: Sequence[Sampled | None]) -> list[Request]:
        """Record a step's results; returns the requests that got a token or finished."""
        changed: list[Request] = []
        for item, token in zip(out.scheduled, sampled, strict=True):
            request = item.request
            if request.finished:
                continue  # aborted while the step ran
            request.num_computed_tokens += item.num_new_tokens
            self.block_manager.cache_full_blocks(request)
            if token is None:
                continue
            self._append_and_check(request, token.token_id, token.logprobs)
            if request.finished:
                self._retire(request)
            changed.append(request)
        return changed

    def _append_and_check(self, request: Request, token_id: int, logprobs: TokenLogprobs | None) -> None:
        request.append_token(token_id, logprobs)
        params = request.sampling_params
        if self.config.role is Role.PREFILL or request.prefill_only:
            request.status = RequestStatus.FINISHED_PREFILLED
            return
        past_min = request.num_output_tokens > params.min_tokens
        if past_min and token_id in params.stop_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = token_id
        elif past_min and not params.ignore_eos and token_id in request.eos_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
        elif request.num_output_tokens >= params.max_tokens or request.num_tokens >= self.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH

    # -- endings -------------------------------------------------------------------

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request from outside (stop string matched, client abort)."""
        request = self.requests.get(request_id)
        if request is None or request.finished:
            return None
        assert status.finished
        request.status = status
        self._retire(request)
        return request

    def abort(self, request_id: str) -> Request | None:
        """Abort a request wherever it is; its blocks (held ones too) are freed."""
        if request_id in self.held:
            self.release(request_id)
            return None
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def release(self, request_id: str) -> None:
        """Prefill role: the decode side has the KV; free the held blocks."""
        request = self.held.pop(request_id, None)
        if request is not None:
            self.block_manager.release(request_id)

    def _retire(self, request: Request) -> None:
        rid = request.request_id
        self.requests.pop(rid, None)
        self._prefix_waited.discard(rid)
        if request in self.running:
            self.running.remove(request)
        elif rid in self.waiting_for_kv:
            del self.waiting_for_kv[rid]
        elif rid in self.gated:
            del self.gated[rid]
            self._gate_waited.discard(rid)
        elif request in self.waiting:
            self.waiting.remove(request)
        if request.status is RequestStatus.FINISHED_PREFILLED:
            self.block_manager.export(rid)
            self.held[rid] = request
        else:
            self.block_manager.free(rid)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.block_manager.free(request.request_id)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        logger.debug("preempted %s (%d tokens to recompute)", request.request_id, request.num_tokens)

    # -- queries -------------------------------------------------------------------

    @property
    def num_unfinished(self) -> int:
        """Requests gated, waiting, running or waiting for KV (held ones are finished)."""
        return len(self.gated) + len(self.waiting) + len(self.running) + len(self.waiting_for_kv)

    def has_unfinished_requests(self) -> bool:
        """True while any request still needs steps or remote KV."""
        return self.num_unfinished > 0
