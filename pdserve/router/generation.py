"""Running a request's generations in the backend, and noticing a departed client.

Lifecycle of one choice (:func:`generate`):

1. Start the backend generation; every event's token ids go through the
   choice's own :class:`Detokenizer`, which turns them into text, cuts stop
   strings and holds back text that could still become one.
2. Yield one :class:`Output` per event, the last with a ``finish_reason``.
3. A generation that ends without the backend's finished event (stop string,
   client gone, error) is aborted in the backend, shielded from cancellation
   so that it happens while the request is being torn down.

The choices of a request are merged into one stream (:func:`merge`);
:func:`unless_disconnected` and :class:`EventStreamResponse` cancel the work
as soon as the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pdserve.request import TokenLogprobs
from pdserve.router.backend import Backend, BackendError, GenerationEvent
from pdserve.router.prompts import Choice
from pdserve.tokenizer import Tokenizer
from pdserve.tokenizer.detokenizer import Detokenizer

logger = logging.getLogger(__name__)

T = TypeVar("T")

ABORT_TIMEOUT_S = 5.0


@dataclass
class Output:
    """What one backend event became for one choice."""

    choice: Choice
    text: str = ""
    num_new_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    text_offsets: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0


async def generate(backend: Backend, tokenizer: Tokenizer, choice: Choice) -> AsyncGenerator[Output, None]:
    """The outputs of one choice's generation, ending with the one that finishes it."""
    detokenizer = Detokenizer(tokenizer, choice.params.stop)
    want_logprobs = choice.params.logprobs is not None
    num_cached_tokens = 0
    done = False  # the backend needs no abort: it finished, or was already aborted
    events: AsyncIterator[GenerationEvent] | None = None
    trace = choice.trace
    outcome = "aborted"
    try:
        events = backend.generate(choice.request_id, choice.prompt_token_ids, choice.params, trace=trace)
        async for event in events:
            num_cached_tokens = max(num_cached_tokens, event.num_cached_tokens)
            if trace is not None:
                trace.tokens(len(event.token_ids))
            out = Output(choice)
            for token_id in event.token_ids:
                if want_logprobs:
                    out.text_offsets.append(len(detokenizer.text))
                detokenizer.add_tokens([token_id])
                out.num_new_tokens += 1
                if detokenizer.stop_reason is not None:
                    break  # tokens after a stop string are dropped
            if want_logprobs and event.logprobs:
                out.logprobs = event.logprobs[: out.num_new_tokens]
            if detokenizer.stop_reason is not None:
                out.finish_reason, out.stop_reason = "stop", detokenizer.stop_reason
                if not event.finished:
                    await abort(backend, choice.request_id)
            elif event.finished:
                out.finish_reason = event.finish_reason or "stop"
                out.stop_reason = event.stop_reason
            out.text = detokenizer.take_delta(out.finish_reason is not None)
            if out.finish_reason is not None:
                done = True
                out.num_cached_tokens = num_cached_tokens
                if trace is not None:  # ended before the last output, so that it can carry the trace
                    trace.end("finished", out.finish_reason)
                yield out
                return
            yield out
        raise BackendError("the backend ended a generation without finishing it", status=502)
    except Exception:
        outcome = "error"
        raise
    finally:
        if trace is not None:
            trace.end(outcome)  # no-op when it finished
        if not done:
            await abort(backend, choice.request_id)
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            with anyio.CancelScope(shield=True):
                await aclose()


async def abort(backend: Backend, request_id: str) -> None:
    """Abort a generation; runs to the end even inside a cancelled request."""
    with anyio.move_on_after(ABORT_TIMEOUT_S, shield=True):
        try:
            await backend.abort(request_id)
        except Exception:
            logger.warning("aborting %s failed", request_id, exc_info=True)


def merge(generators: list[AsyncGenerator[Output, None]]) -> AsyncGenerator[Output, None]:
    """One stream of the outputs of several generations, in arrival order."""
    if len(generators) == 1:
        return generators[0]
    return _merge_many(generators)


async def _merge_many(generators: list[AsyncGenerator[Output, None]]) -> AsyncGenerator[Output, None]:
    queue: asyncio.Queue[Output | Exception | None] = asyncio.Queue()

    async def pump(gen: AsyncGenerator[Output, None]) -> None:
        try:
            async with contextlib.aclosing(gen):
                async for out in gen:
                    queue.put_nowait(out)
            queue.put_nowait(None)
        except Exception as e:
            queue.put_nowait(e)

    tasks = [asyncio.create_task(pump(gen)) for gen in generators]
    try:
        num_running = len(tasks)
        while num_running:
            item = await queue.get()
            if item is None:
                num_running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """``await work``; if the client goes away first, cancel it and return None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait((task,))
    return None if task.cancelled() else task.result()


class EventStreamResponse(StreamingResponse):
    """An SSE response that notices a departed client at once on every ASGI server.

    The stream is cancelled as soon as the client disconnects (not at the next
    write), and the event generator is always closed, which aborts its
    generations; ``on_close`` runs after that, once.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncGenerator[str, None],
        headers: dict[str, str],
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(events, headers=headers)
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    with contextlib.suppress(OSError):  # ASGI ≥ 2.4 servers: client gone
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            try:
                with anyio.CancelScope(shield=True):
                    await self._events.aclose()
            finally:
                if self._on_close is not None:
                    on_close, self._on_close = self._on_close, None
                    on_close()
