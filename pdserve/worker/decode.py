"""Decode side of the KV hand-off: reserve blocks, receive KV, join the batch.

Lifecycle of one request on a decode worker:

1. ``DecodeRequest`` arrives: ``admit`` reserves blocks for the prompt (or
   queues the request until blocks free up) and reports them (``Reserved``),
   so the prefill worker knows where to write. Leading blocks already in this
   worker's prefix cache (say, the previous turn of a conversation it
   decoded) are shared instead: ``Reserved`` says how many tokens they cover
   and the prefill worker writes only the rest.
2. The prefill worker writes each layer's KV straight into those blocks.
3. ``poll`` sees the transfer's "done" notice (which carries the first token):
   the request joins the running batch (``finish_remote_kv``) and
   ``KVReceived`` lets the prefill side free its copy.
4. The engine decodes it with everything else until it finishes.

An abort while the KV is still arriving must not free the blocks at once: the
prefill worker may still be writing into them. They stay quarantined until the
transfer's "done" (a prefill worker that aborts sends one) or a deadline.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import msgspec

from pdserve.engine.engine import LLMEngine, RequestOutput
from pdserve.request import Request, TokenLogprobs
from pdserve.transfer.base import KVDone, KVReceiver
from pdserve.worker.prefill import FirstToken

logger = logging.getLogger(__name__)


@dataclass
class Arrival:
    """A request whose KV is complete, as the worker loop needs to report it."""

    output: RequestOutput
    num_bytes: int
    transfer_s: float


class KVIntake:
    """Reservations and KV arrivals of a decode worker."""

    def __init__(self, engine: LLMEngine, receiver: KVReceiver, quarantine_s: float = 30.0) -> None:
        self.engine = engine
        self.receiver = receiver
        self.quarantine_s = quarantine_s
        self._pending: deque[Request] = deque()
        self._quarantined: dict[str, float] = {}
        self._writer_of: dict[str, str] = {}  # request id → prefill worker writing its KV
        self.num_bytes_received = 0
        self.num_transfers = 0
        self.num_deferred = 0  # reservations that found no room: their prefill waits (gated)

    def admit(self, request: Request, writer_id: str = "") -> list[int] | None:
        """Reserve blocks now (returns their ids) or queue the request (returns None).

        ``writer_id`` is the prefill worker that will write the KV.
        """
        self._writer_of[request.request_id] = writer_id
        if not self._pending:
            block_ids = self.engine.add_remote_request(request)
            if block_ids is not None:
                return block_ids
        self._pending.append(request)
        self.num_deferred += 1
        return None

    def retry_pending(self) -> list[tuple[str, list[int], int]]:
        """Reserve for queued requests, first come first served, while blocks allow.

        Returns (request id, block ids, leading tokens already cached) of each.
        """
        reserved = []
        while self._pending:
            block_ids = self.engine.add_remote_request(self._pending[0])
            if block_ids is None:
                break
            request = self._pending.popleft()
            reserved.append((request.request_id, block_ids, request.num_computed_tokens))
        return reserved

    def abort(self, request_id: str) -> None:
        """Abort; blocks that may still be written to are quarantined, not freed."""
        if request_id in self.engine.scheduler.waiting_for_kv:
            self._quarantined[request_id] = time.monotonic() + self.quarantine_s
            return
        self._writer_of.pop(request_id, None)
        for request in self._pending:
            if request.request_id == request_id:
                self._pending.remove(request)
                return
        self.engine.abort_request(request_id)

    def peer_lost(self, writer_id: str) -> None:
        """A prefill worker is gone: quarantined blocks it was writing are safe to free."""
        for rid in [r for r in self._quarantined if self._writer_of.get(r) == writer_id]:
            self._free_quarantined(rid)

    def _free_quarantined(self, rid: str) -> None:
        del self._quarantined[rid]
        self._writer_of.pop(rid, None)
        self.receiver.discard(rid)
        self.engine.abort_request(rid)

    def poll(self) -> list[Arrival]:
        """Completed transfers become running requests; expired quarantines are freed."""
        arrivals = []
        for done in self.receiver.poll():
            arrival = self._arrive(done)
            if arrival is not None:
                arrivals.append(arrival)
        if self._quarantined:
            now = time.monotonic()
            for rid in [r for r, deadline in self._quarantined.items() if deadline <= now]:
                logger.warning("no KV 'done' for aborted request %s: freeing its blocks", rid)
                self._free_quarantined(rid)
        return arrivals

    def _arrive(self, done: KVDone) -> Arrival | None:
        rid = done.request_id
        self.num_bytes_received += done.num_bytes
        self.num_transfers += 1
        self._writer_of.pop(rid, None)
        if rid in self._quarantined:
            del self._quarantined[rid]
            self.engine.abort_request(rid)
            return None
        if rid not in self.engine.scheduler.waiting_for_kv:
            logger.warning("KV 'done' for unknown request %s ignored", rid)
            return None
        if done.error is not None:
            logger.warning("KV transfer of %s failed: %s", rid, done.error)
            self.engine.abort_request(rid)  # no more writes will come: the blocks are free to reuse
            return None
        first = msgspec.msgpack.decode(done.payload, type=FirstToken)
        logprobs = TokenLogprobs(*first.logprobs) if first.logprobs else None
        output = self.engine.finish_remote_kv(rid, first.token_id, logprobs)
        return Arrival(output, done.num_bytes, done.transfer_s)

    @property
    def num_quarantined(self) -> int:
        """Aborted requests whose reserved blocks wait for their transfer to end."""
        return len(self._quarantined)

    @property
    def num_pending(self) -> int:
        """Requests waiting for blocks to be reserved."""
        return len(self._pending)
