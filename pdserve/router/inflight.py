"""The router's record of one request in flight, across retries and migrations.

Lifecycle (``Stage``):

1. ``PREFILL``: dispatched; the prefill worker (or a mixed worker, or a
   decode worker doing a fallback prefill) is computing the prompt.
2. ``TRANSFER``: the first token is out; the KV is moving to the decode
   worker, under the KV deadline.
3. ``DECODE``: the decode (or mixed) worker streams the remaining tokens.

Every placement on workers is an *attempt* with its own worker-side id
(``request_id.attempt``), so late messages from an abandoned attempt are
recognised and dropped, and a worker can hold two attempts of one request
(one quarantined) without confusion. The tokens already delivered to the
client are kept: a new attempt resumes from them (same seed, same output
index), so the client's stream continues with no duplicate or gap.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

from pdserve.router.backend import BackendError, GenerationEvent
from pdserve.router.tracing import RequestTrace
from pdserve.worker.protocol import WireSamplingParams


class Stage(enum.Enum):
    """Where a request is on the path prefill → transfer → decode."""

    PREFILL = "prefill"
    TRANSFER = "transfer"
    DECODE = "decode"


@dataclass
class Inflight:
    """One client request as the dispatcher tracks it."""

    request_id: str
    prompt: list[int]
    params: WireSamplingParams
    trace: RequestTrace
    queue: asyncio.Queue[GenerationEvent | BackendError] = field(default_factory=asyncio.Queue)
    tokens: list[int] = field(default_factory=list)
    attempt: int = 0
    prefill_id: str | None = None  # set only when the KV is handed over from another worker
    decode_id: str | None = None  # the worker that streams tokens (decode, mixed, or fallback)
    stage: Stage = Stage.PREFILL
    deadline_s: float | None = None
    excluded: set[str] = field(default_factory=set)
    prefill_charge: tuple[str, int] | None = None  # queued prompt tokens charged to a worker (placement)
    finished: bool = False
    tokens_seen: bool = False  # a token message arrived (TTFT measured)
    created_s: float = field(default_factory=time.monotonic)

    @property
    def worker_rid(self) -> str:
        """The id workers know the current attempt by."""
        return f"{self.request_id}.{self.attempt}"

    @property
    def worker_ids(self) -> list[str]:
        """Workers involved in the current attempt."""
        return [w for w in (self.prefill_id, self.decode_id) if w is not None]

    def enter(self, stage: Stage, deadline_s: float | None) -> None:
        """Move to a stage with its deadline (seconds from now, None for none)."""
        self.stage = stage
        self.deadline_s = time.monotonic() + deadline_s if deadline_s is not None else None
