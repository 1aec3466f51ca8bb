"""Turning a request's outputs into OpenAI's answers: one JSON body, or SSE chunks.

1. Non-streaming: :func:`collect` gathers every choice into a
   :class:`ChoiceResult` and counts :class:`Usage`; the endpoint's
   :class:`Format` makes the body.
2. Streaming: :func:`sse_events` sends the endpoint's opening chunks, one
   chunk per output, the usage chunk when asked for; a later error becomes an
   ``error`` event, and the stream always ends with ``data: [DONE]``.

Logprobs are reported per token piece (:class:`LogprobsFormatter`).

With ``plan.return_trace`` each choice's trace (:mod:`~pdserve.router.tracing`)
goes into the ``pdserve_trace`` extension field: of the body, or of the chunk
that finishes the choice.
"""

from __future__ import annotations

import contextlib
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import anyio
from pydantic import BaseModel

from pdserve.request import TokenLogprobs
from pdserve.router.errors import as_api_error
from pdserve.router.generation import Output
from pdserve.router.openai_protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    PromptTokensDetails,
    TopLogprob,
    UsageInfo,
)
from pdserve.router.prompts import Plan
from pdserve.tokenizer import Tokenizer

_DONE = "data: [DONE]\n\n"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass
class ChoiceResult:
    """A whole choice, collected for a non-streaming answer."""

    text_parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    text_offsets: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, out: Output) -> None:
        """Append one output of this choice."""
        self.text_parts.append(out.text)
        self.logprobs.extend(out.logprobs)
        self.text_offsets.extend(out.text_offsets)
        if out.finish_reason is not None:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason


class Usage:
    """Token counts of a request: prompts once each, every generated token, cache hits of sample 0."""

    def __init__(self, num_prompt_tokens: int) -> None:
        self.num_prompt_tokens = num_prompt_tokens
        self.num_completion_tokens = 0
        self.num_cached_tokens = 0

    def add(self, out: Output) -> None:
        """Count one output."""
        self.num_completion_tokens += out.num_new_tokens
        if out.finish_reason is not None and out.choice.sample_index == 0:
            self.num_cached_tokens += out.num_cached_tokens

    def info(self) -> UsageInfo:
        """The ``usage`` object of the answer."""
        return UsageInfo(
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=self.num_completion_tokens,
            total_tokens=self.num_prompt_tokens + self.num_completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.num_cached_tokens),
        )


# -- logprobs --------------------------------------------------------------------------------


class LogprobsFormatter:
    """Logprobs in each endpoint's shape; caches token pieces (one per app)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._pieces: dict[int, str] = {}

    def piece(self, token_id: int) -> str:
        """The token's text piece, cached."""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self.tokenizer.id_to_piece(token_id)
        return piece

    def completion_logprobs(
        self, logprobs: list[TokenLogprobs], text_offsets: list[int], num_top: int
    ) -> CompletionLogprobs:
        """Logprobs in ``/v1/completions``' shape."""
        return CompletionLogprobs(
            tokens=[self.piece(lp.token_id) for lp in logprobs],
            token_logprobs=[lp.logprob for lp in logprobs],
            top_logprobs=[{self.piece(t): v for t, v in _top(lp, num_top)} for lp in logprobs],
            text_offset=text_offsets[: len(logprobs)],
        )

    def chat_logprobs(self, logprobs: list[TokenLogprobs], num_top: int) -> ChatLogprobs:
        """Logprobs in ``/v1/chat/completions``' shape."""
        content = []
        for lp in logprobs:
            piece = self.piece(lp.token_id)
            top = [
                TopLogprob(token=p, logprob=v, bytes=_piece_bytes(p))
                for p, v in ((self.piece(t), v) for t, v in _top(lp, num_top))
            ]
            content.append(
                ChatTokenLogprob(token=piece, logprob=lp.logprob, bytes=_piece_bytes(piece), top_logprobs=top)
            )
        return ChatLogprobs(content=content)


def _top(lp: TokenLogprobs, num_top: int) -> list[tuple[int, float]]:
    return sorted(lp.top.items(), key=lambda item: -item[1])[:num_top]


def _piece_bytes(piece: str) -> list[int]:
    """UTF-8 bytes of a token; byte-fallback pieces such as ``<0xE2>`` are the byte itself."""
    match = _BYTE_PIECE.fullmatch(piece)
    return [int(match.group(1), 16)] if match else list(piece.encode("utf-8", errors="replace"))


# -- response shapes -------------------------------------------------------------------------


class Format(ABC):
    """How one endpoint turns outputs into chunks and bodies."""

    def __init__(self, model: str, logprobs: LogprobsFormatter) -> None:
        self.model = model
        self.logprobs = logprobs

    def opening_chunks(self, plan: Plan) -> list[BaseModel]:
        """Chunks sent before the first output."""
        return []

    @abstractmethod
    def chunk(self, plan: Plan, out: Output) -> BaseModel | None:
        """The chunk of one output; None when it has nothing to send."""

    @abstractmethod
    def usage_chunk(self, plan: Plan, usage: UsageInfo) -> BaseModel:
        """The last chunk, with the usage and no choices."""

    @abstractmethod
    def body(self, plan: Plan, results: list[ChoiceResult], usage: Usage) -> BaseModel:
        """The non-streaming answer."""


class CompletionFormat(Format):
    """``/v1/completions``."""

    def _logprobs(
        self, plan: Plan, lps: list[TokenLogprobs], offsets: list[int]
    ) -> CompletionLogprobs | None:
        if plan.num_top_logprobs is None:
            return None
        return self.logprobs.completion_logprobs(lps, offsets, plan.num_top_logprobs)

    def chunk(self, plan: Plan, out: Output) -> BaseModel | None:
        if not (out.text or out.logprobs or out.finish_reason):
            return None
        choice = CompletionChoice(
            index=out.choice.index, text=out.text,
            logprobs=self._logprobs(plan, out.logprobs, out.text_offsets),
            finish_reason=out.finish_reason, stop_reason=out.stop_reason,
        )
        return CompletionResponse(id=plan.response_id, created=plan.created, model=self.model,
                                  choices=[choice])

    def usage_chunk(self, plan: Plan, usage: UsageInfo) -> BaseModel:
        return CompletionResponse(
            id=plan.response_id, created=plan.created, model=self.model, choices=[], usage=usage
        )

    def body(self, plan: Plan, results: list[ChoiceResult], usage: Usage) -> BaseModel:
        choices = [
            CompletionChoice(
                index=i, text="".join(r.text_parts),
                logprobs=self._logprobs(plan, r.logprobs, r.text_offsets),
                finish_reason=r.finish_reason, stop_reason=r.stop_reason,
            )
            for i, r in enumerate(results)
        ]
        return CompletionResponse(
            id=plan.response_id, created=plan.created, model=self.model, choices=choices,
            usage=usage.info(), pdserve_trace=traces(plan),
        )


class ChatFormat(Format):
    """``/v1/chat/completions``."""

    def _logprobs(self, plan: Plan, lps: list[TokenLogprobs]) -> ChatLogprobs | None:
        if plan.num_top_logprobs is None:
            return None
        return self.logprobs.chat_logprobs(lps, plan.num_top_logprobs)

    def _chunk(
        self, plan: Plan, choices: list[ChatStreamChoice], usage: UsageInfo | None = None
    ) -> BaseModel:
        return ChatCompletionChunk(
            id=plan.response_id, created=plan.created, model=self.model, choices=choices, usage=usage
        )

    def opening_chunks(self, plan: Plan) -> list[BaseModel]:
        role = ChatDelta(role="assistant", content="")
        return [self._chunk(plan, [ChatStreamChoice(index=c.index, delta=role)]) for c in plan.choices]

    def chunk(self, plan: Plan, out: Output) -> BaseModel | None:
        if not (out.text or out.logprobs or out.finish_reason):
            return None
        choice = ChatStreamChoice(
            index=out.choice.index, delta=ChatDelta(content=out.text or None),
            logprobs=self._logprobs(plan, out.logprobs),
            finish_reason=out.finish_reason, stop_reason=out.stop_reason,
        )
        return self._chunk(plan, [choice])

    def usage_chunk(self, plan: Plan, usage: UsageInfo) -> BaseModel:
        return self._chunk(plan, [], usage)

    def body(self, plan: Plan, results: list[ChoiceResult], usage: Usage) -> BaseModel:
        choices = [
            ChatChoice(
                index=i, message=ChatResponseMessage(content="".join(r.text_parts)),
                logprobs=self._logprobs(plan, r.logprobs),
                finish_reason=r.finish_reason, stop_reason=r.stop_reason,
            )
            for i, r in enumerate(results)
        ]
        return ChatCompletionResponse(
            id=plan.response_id, created=plan.created, model=self.model, choices=choices,
            usage=usage.info(), pdserve_trace=traces(plan),
        )


# -- answers ---------------------------------------------------------------------------------


def dump_json(model: BaseModel, exclude: set[str] | None = None) -> str:
    """A response model as JSON, without the ``pdserve_trace`` extension when it is unset."""
    if getattr(model, "pdserve_trace", None) is None:
        exclude = (exclude or set()) | {"pdserve_trace"}
    return model.model_dump_json(exclude=exclude)


def traces(plan: Plan, outputs: list[Output] | None = None) -> list[dict[str, Any]] | None:
    """The traces of the given outputs' choices (every choice when None), if the plan returns them."""
    if not plan.return_trace:
        return None
    choices = plan.choices if outputs is None else [o.choice for o in outputs]
    return [{"index": c.index, **c.trace.to_dict()} for c in choices if c.trace is not None]


async def collect(plan: Plan, outputs: AsyncGenerator[Output, None]) -> tuple[list[ChoiceResult], Usage]:
    """Every choice of the request, whole, and its usage."""
    results = [ChoiceResult() for _ in plan.choices]
    usage = Usage(plan.num_prompt_tokens)
    async with contextlib.aclosing(outputs):
        async for out in outputs:
            usage.add(out)
            results[out.choice.index].add(out)
    return results, usage


async def sse_events(
    plan: Plan, fmt: Format, first: Output, outputs: AsyncGenerator[Output, None]
) -> AsyncGenerator[str, None]:
    """The SSE events of a streamed answer, starting from its first output; always ends ``[DONE]``."""
    usage = Usage(plan.num_prompt_tokens)
    out: Output | None = first
    try:
        for opening in fmt.opening_chunks(plan):
            yield _sse_data(opening, plan)
        while out is not None:
            usage.add(out)
            chunk = fmt.chunk(plan, out)
            if chunk is not None:
                if out.finish_reason is not None and plan.return_trace:
                    chunk = chunk.model_copy(update={"pdserve_trace": traces(plan, [out])})
                yield _sse_data(chunk, plan)
            out = await anext(outputs, None)
        if plan.include_usage:
            yield _sse_data(fmt.usage_chunk(plan, usage.info()), plan)
    except Exception as exc:
        yield f"data: {as_api_error(exc, plan.response_id).body().model_dump_json()}\n\n"
    finally:
        with anyio.CancelScope(shield=True):
            await outputs.aclose()
    yield _DONE


def _sse_data(chunk: BaseModel, plan: Plan) -> str:
    # OpenAI: with include_usage every chunk has "usage" (null but in the last one)
    exclude = None if plan.include_usage else {"usage"}
    return f"data: {dump_json(chunk, exclude)}\n\n"
