"""The contract between the HTTP front end (:mod:`pdserve.router.app`) and whatever runs generations.

The app tokenises, validates and detokenises; a :class:`Backend` turns token
ids into token ids. One generation's life, as the app drives it:

1. ``generate(request_id, prompt_token_ids, params, trace)`` returns an async
   iterator of :class:`GenerationEvent`; the backend records in ``trace``
   (when given) where it sent the request and when the first token came. It may raise :class:`BackendError`
   before the first event (overloaded: 429/503 with ``retry_after_s``) or
   during the stream (a worker failed and the request could not be migrated).
2. Each event carries the *new* output token ids since the previous event;
   the last one has ``finished=True`` and a ``finish_reason``.
3. The backend ignores ``params.stop`` strings; matching them is the app's job.
   When one matches, or the client goes away, or anything fails before a
   finished event arrived, the app calls ``abort(request_id)`` and stops
   iterating. ``abort`` is idempotent: an unknown or already finished id is
   ignored.

Ownership: the backend owns every resource of a generation (queue slots, KV
blocks on workers) and frees them when the generation finishes, fails, or is
aborted. The app never holds anything that needs freeing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from pdserve.request import TokenLogprobs
from pdserve.router.tracing import RequestTrace
from pdserve.sampling_params import SamplingParams


@dataclass
class GenerationEvent:
    """New output of one generation since its previous event.

    Attributes:
        token_ids: the new output token ids, in order, never repeated.
        logprobs: one entry per new token when ``params.logprobs`` is set, else None.
        finished: True on the last event of the generation.
        finish_reason: ``"stop"`` (EOS or a stop token id), ``"length"``
            (max_tokens or the context limit) or ``"abort"``; set when finished.
        stop_reason: the stop token id that ended the generation, if one did.
        num_prompt_tokens: prompt length as the backend saw it.
        num_cached_tokens: prompt tokens served from a prefix cache.
    """

    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


class BackendError(Exception):
    """A generation could not be started or continued; the app answers with ``status``.

    Attributes:
        status: HTTP status for the client (429 overloaded, 503 unavailable, 500 …).
        code: OpenAI error ``code`` (e.g. ``"rate_limit_exceeded"``), or None.
        retry_after_s: sent as ``Retry-After`` when set.
    """

    def __init__(
        self,
        message: str,
        status: int = 503,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.retry_after_s = retry_after_s


class Backend(Protocol):
    """What the HTTP front end needs from the serving side."""

    model_name: str

    @property
    def max_model_len(self) -> int:
        """The longest prompt + output a request may have, in tokens."""
        ...

    def is_ready(self) -> bool:
        """True when a request sent now can be served (workers registered and up)."""
        ...

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        trace: RequestTrace | None = None,
    ) -> AsyncIterator[GenerationEvent]:
        """Start one generation; iterate for its events (see the module docstring)."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a generation and free what it holds; idempotent."""
        ...
