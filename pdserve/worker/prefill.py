"""Prefill side of the KV hand-off: push each layer's KV as it is computed.

Lifecycle of one request on a prefill worker:

1. ``PrefillRequest`` arrives: the engine queues it gated (the worker
   computes nothing of it before its KV has a home); ``track`` records its
   decode peer. The decode worker's block ids arrive separately (``Blocks``)
   and open the gate. (An engine driven without the gate may start computing
   first: step 3.)
2. Every step, ``on_schedule`` notes which token range of each tracked
   request the step computes; ``on_layer_done(layer)`` then pushes, for every
   request whose destination is known, the blocks that range touched in that
   layer — the copy overlaps with the remaining layers' compute.
3. If the destination arrives late, ``set_destination`` pushes everything
   computed so far at once. Blocks the decode worker already holds (its
   prefix cache had them) count as pushed from the start: only new KV moves.
4. When the prompt is done (first token sampled) and every layer is pushed,
   ``send_done`` hands the first token to the decode worker on the KV channel,
   after all of the request's data.
5. The engine holds the blocks (lease) until the router relays the decode
   worker's ``KVReceived`` as ``Release``; ``forget`` drops the tracking.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import msgspec

from pdserve.engine.engine import LLMEngine
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.request import Request, TokenLogprobs
from pdserve.transfer.base import KVDescriptor, KVSender

logger = logging.getLogger(__name__)


class FirstToken(msgspec.Struct):
    """Payload of the "done" notice: what the decode worker needs to continue."""

    token_id: int
    logprobs: tuple[int, float, dict[int, float]] | None = None


@dataclass
class _Handoff:
    peer_id: str
    dst_block_ids: list[int] | None = None
    num_pushed_tokens: int = 0  # tokens whose KV is pushed for every layer
    step_range: tuple[int, int] | None = None  # tokens computed by the running step
    first_token: FirstToken | None = None
    done_sent: bool = False
    started_s: float = field(default_factory=time.perf_counter)
    first_push_s: float | None = None  # perf_counter time of the first push


class KVPusher:
    """Streams prompt KV from this worker's cache into decode workers' blocks."""

    def __init__(self, engine: LLMEngine, sender: KVSender, drop_done: bool = False) -> None:
        self.engine = engine
        self.drop_done = drop_done  # fault injection for tests: hand-offs never complete
        self.sender = sender
        self.block_size = engine.config.cache.block_size
        self.num_layers = engine.arch.num_layers
        self._handoffs: dict[str, _Handoff] = {}
        self.num_done_sent = 0

    def track(self, request_id: str, peer_id: str, descriptor: KVDescriptor) -> None:
        """A request whose KV goes to ``peer_id``; connects to the peer once."""
        self.sender.connect(peer_id, descriptor)
        self._handoffs[request_id] = _Handoff(peer_id)

    def forget(self, request_id: str) -> None:
        """Stop tracking (released, aborted or failed)."""
        self._handoffs.pop(request_id, None)

    def first_push_s(self, request_id: str) -> float | None:
        """When (``time.perf_counter``) the request's first KV push started; None before it."""
        h = self._handoffs.get(request_id)
        return h.first_push_s if h is not None else None

    def is_tracked(self, request_id: str) -> bool:
        """True while the request's hand-off is in progress."""
        return request_id in self._handoffs

    # -- StepHooks -------------------------------------------------------------------

    def on_schedule(self, out: SchedulerOutput) -> None:
        """Record which tokens of each tracked request this step computes."""
        for item in out.scheduled:
            h = self._handoffs.get(item.request.request_id)
            if h is not None:
                # Tokens found in the prefix cache were never computed here: push them too.
                h.step_range = (h.num_pushed_tokens, item.num_computed_tokens + item.num_new_tokens)

    def on_layer_done(self, layer: int) -> None:
        """Push this layer's freshly written blocks to every known destination."""
        for rid, h in self._handoffs.items():
            if h.step_range is not None and h.dst_block_ids is not None:
                self._push(rid, h, layer, *h.step_range)

    def after_step(self) -> None:
        """Commit the step's progress and send "done" where the prompt is complete."""
        for rid, h in self._handoffs.items():
            if h.step_range is not None:
                if h.dst_block_ids is not None:
                    # max(): after a preemption the recompute re-covers pushed tokens.
                    h.num_pushed_tokens = max(h.num_pushed_tokens, h.step_range[1])
                h.step_range = None
            self._maybe_done(rid, h)

    # -- events --------------------------------------------------------------------------

    def set_destination(self, request_id: str, block_ids: list[int], num_cached_tokens: int = 0) -> None:
        """The decode worker's blocks are known: catch up on what was computed.

        The first ``num_cached_tokens`` (whole blocks) are already in the decode
        worker's cache: they are never sent.
        """
        h = self._handoffs.get(request_id)
        if h is None:
            return
        h.dst_block_ids = block_ids
        if num_cached_tokens % self.block_size:
            raise ValueError(f"cached prefix of {num_cached_tokens} tokens is not whole blocks")
        h.num_pushed_tokens = max(h.num_pushed_tokens, num_cached_tokens)
        computed = self._request(request_id).num_computed_tokens
        if computed > h.num_pushed_tokens:
            for layer in range(self.num_layers):
                self._push(request_id, h, layer, h.num_pushed_tokens, computed)
            h.num_pushed_tokens = computed
        self._maybe_done(request_id, h)

    def prefill_finished(self, request_id: str, token_id: int, logprobs: TokenLogprobs | None) -> None:
        """The first token is sampled; "done" follows once all KV is pushed."""
        h = self._handoffs.get(request_id)
        if h is not None:
            wire_lp = (logprobs.token_id, logprobs.logprob, logprobs.top) if logprobs else None
            h.first_token = FirstToken(token_id, wire_lp)

    def abort(self, request_id: str) -> None:
        """Stop pushing; tell the decode side its blocks are no longer written to."""
        h = self._handoffs.pop(request_id, None)
        # (with the drop-done fault the "done" never left: the abort notice must)
        # Even with no block sent yet: the decode side must learn that none will come.
        if h is not None and (not h.done_sent or self.drop_done):
            self.sender.send_abort(h.peer_id, request_id, "aborted by the prefill worker")

    # -- internals -----------------------------------------------------------------------

    def _request(self, request_id: str) -> Request:
        sched = self.engine.scheduler
        request = sched.requests.get(request_id) or sched.held.get(request_id)
        assert request is not None, f"tracked request {request_id} unknown to the engine"
        return request

    def _push(self, request_id: str, h: _Handoff, layer: int, lo: int, hi: int) -> None:
        if hi <= lo:
            return
        assert h.dst_block_ids is not None
        if h.first_push_s is None:
            h.first_push_s = time.perf_counter()
        first, last = lo // self.block_size, -(-hi // self.block_size)
        src = self.engine.block_manager.block_ids(request_id)[first:last]
        dst = h.dst_block_ids[first:last]
        self.sender.send_blocks(h.peer_id, request_id, layer, src, dst)

    def _maybe_done(self, request_id: str, h: _Handoff) -> None:
        if h.done_sent or h.first_token is None or h.dst_block_ids is None:
            return
        # A held request has computed every token but the one just sampled.
        if h.num_pushed_tokens < self._request(request_id).num_computed_tokens:
            return
        h.done_sent = True
        if self.drop_done:
            logger.warning("fault injection: dropping the KV 'done' notice of %s", request_id)
            return
        self.sender.send_done(h.peer_id, request_id, msgspec.msgpack.encode(h.first_token))
        self.num_done_sent += 1
        logger.debug(
            "kv done %s -> %s after %.1f ms", request_id, h.peer_id, (time.perf_counter() - h.started_s) * 1e3
        )
