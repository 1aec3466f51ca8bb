"""One generation request and its explicit state machine.

Lifecycle (mixed role):

1. ``WAITING``: queued; no KV blocks.
2. ``RUNNING``: holds blocks; computes its prompt in one or more chunks, then
   one token per step. Preemption returns it to ``WAITING`` with its blocks
   freed and its progress reset (recompute).
3. ``FINISHED_*``: done; its blocks are freed by the scheduler.

Disaggregated roles add two states: a decode engine parks a request in
``WAITING_FOR_KV`` (blocks reserved, KV arriving from a prefill worker) until
its KV and first token are in; a prefill engine ends a request in
``FINISHED_PREFILLED`` with its blocks still held, until they are released.
A mixed engine does either for the requests that ask for it (it computes a
``prefill_only`` request for another worker to decode, and parks a request
whose KV another worker computes), and serves its own requests whole.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from pdserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    """Where a request is in its lifecycle."""

    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"
    RUNNING = "running"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"
    FINISHED_PREFILLED = "finished_prefilled"

    @property
    def finished(self) -> bool:
        """True for every terminal state."""
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI ``finish_reason`` of a terminal state, else None."""
        return _FINISH_REASONS.get(self)


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
    RequestStatus.FINISHED_PREFILLED,
}
_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_PREFILLED: "prefilled",
}


@dataclass
class TokenLogprobs:
    """Log-probabilities around one generated token."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class Request:
    """A prompt, what has been generated for it, and its progress.

    ``num_computed_tokens`` counts tokens whose KV is in the cache; the
    scheduler advances it, the block manager sizes blocks from it.
    ``prefill_only``: the request ends ``FINISHED_PREFILLED`` after its first
    token, its blocks held for a hand-off (always so on a prefill engine).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    arrival_time_s: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    stop_reason: str | int | None = None
    prefill_only: bool = False  # its KV is handed to another worker after the first token
    all_token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        """Tokens in the prompt."""
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far."""
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.all_token_ids)

    @property
    def finished(self) -> bool:
        """True once the request reached a terminal state."""
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        """OpenAI finish reason, once finished."""
        return self.status.finish_reason

    def append_token(self, token_id: int, logprobs: TokenLogprobs | None = None) -> None:
        """Record one generated token (and its log-probabilities when asked for)."""
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)
