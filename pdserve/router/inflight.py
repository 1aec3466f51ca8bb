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
import logging
import time
from dataclasses import dataclass, field

from pdserve.request import TokenLogprobs
from pdserve.router.backend import BackendError, GenerationEvent
from pdserve.router.dispatch_config import DispatcherConfig
from pdserve.router.tracing import RequestTrace
from pdserve.worker.protocol import Tokens, WireSamplingParams

logger = logging.getLogger(__name__)


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

    def overdue(self, config: DispatcherConfig) -> tuple[str, set[str]]:
        """Why the current stage ran past its deadline, and the workers suspected of it."""
        if self.stage is Stage.TRANSFER:
            suspects = {self.prefill_id} if self.prefill_id else set()
            return f"KV transfer missed its {config.kv_timeout_s:.1f} s deadline", suspects
        if self.stage is Stage.DECODE:
            suspects = {self.decode_id} if self.decode_id else set()
            return f"no token for {config.token_timeout_s:.1f} s", suspects
        return f"no first token within {config.prefill_timeout_s:.1f} s", set(self.worker_ids)

    def new_tokens(self, m: Tokens) -> list[int]:
        """The tokens of ``m`` not delivered yet (a resumed attempt repeats none, skips none)."""
        skip = len(self.tokens) - m.start  # tokens of this message already delivered
        if skip < 0:
            logger.warning("router: gap in %s (have %d, got %d)", m.request_id, len(self.tokens), m.start)
            skip = 0
        return m.token_ids[skip:]

    def deliver(self, m: Tokens, new_ids: list[int]) -> None:
        """Record ``new_ids`` (from :meth:`new_tokens`) and queue them for the client as one event."""
        skip = len(m.token_ids) - len(new_ids)
        self.tokens.extend(new_ids)
        logprobs = None
        if m.logprobs is not None:
            logprobs = [TokenLogprobs(t, lp, dict(top)) for t, lp, top in m.logprobs[skip:]]
        self.finished = m.finished
        self.queue.put_nowait(
            GenerationEvent(
                token_ids=new_ids,
                logprobs=logprobs,
                finished=m.finished,
                finish_reason=m.finish_reason,
                stop_reason=m.stop_reason if isinstance(m.stop_reason, int) else None,
                num_prompt_tokens=len(self.prompt),
                num_cached_tokens=m.num_cached_tokens,
            )
        )
