"""An OpenAI-compatible server that streams tokens on a known schedule (no model).

It is the yardstick of the load generator (its tests check the measured
latencies against the schedule) and the "talking to a worker directly"
baseline of the router-overhead benchmark. Plain asyncio and HTTP/1.1 with
keep-alive, so it costs little CPU and depends on nothing.

Lifecycle of one request:

1. Read the request; the schedule is the server's, or the ``slow`` one for
   every ``slow_every``-th request, with per-request overrides from the
   headers ``x-fake-ttft-ms``, ``x-fake-itl-ms``, ``x-fake-tokens-per-chunk``
   and ``x-fake-status`` (answer with that HTTP error instead), or from a
   directive opening the prompt: ``[fake ttft_ms=50 itl_ms=20]``.
2. Streaming: send the headers (and, for chat, the opening ``role`` chunk) at
   once, the first content chunk ``ttft_ms`` after the request arrived and
   chunk j at ``ttft_ms + j·itl_ms`` (absolute deadlines: no drift), each of
   ``tokens_per_chunk`` tokens, ``max_tokens`` tokens in all; then the usage
   chunk when asked for, and ``data: [DONE]``. Non-streaming: one body at
   the time the last token would have been sent.

Prompt tokens are counted as whitespace-separated words (the bench's default
approximation). Run it alone with ``python -m pdserve.bench.fake_server``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

logger = logging.getLogger(__name__)

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Error",
    503: "Busy",
}


@dataclass(frozen=True)
class Schedule:
    """When tokens go out: the first chunk after ``ttft_ms``, then one chunk every ``itl_ms``."""

    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    tokens_per_chunk: int = 1


@dataclass(frozen=True)
class FakeServerConfig:
    """Settings of a :class:`FakeServer`.

    Attributes:
        host, port: where to listen (port 0 picks a free one).
        model: the model name ``/v1/models`` lists.
        schedule: the default schedule.
        slow_every, slow: every ``slow_every``-th request (1-based, counted per server) uses ``slow``.
        fail_every, fail_status: every ``fail_every``-th request is answered with ``fail_status``.
        max_inflight: generate at most this many requests at once; the others queue (0: no limit).
            A request's schedule starts when it leaves the queue, so the server has a capacity.
        default_max_tokens: output length when a request gives no ``max_tokens``.
    """

    host: str = "127.0.0.1"
    port: int = 0
    model: str = "fake"
    schedule: Schedule = Schedule()
    slow_every: int = 0
    slow: Schedule = Schedule()
    fail_every: int = 0
    fail_status: int = 503
    max_inflight: int = 0
    default_max_tokens: int = 16


class FakeServer:
    """The server; ``await start()`` then ``port`` is the bound port."""

    def __init__(self, config: FakeServerConfig) -> None:
        self.config = config
        self.port = config.port
        self.num_requests = 0
        self._counter = itertools.count(1)
        self.max_seen_inflight = 0  # most requests generating at once
        self._num_inflight = 0
        self._slots = asyncio.Semaphore(config.max_inflight) if config.max_inflight else None
        self._server: asyncio.AbstractServer | None = None
        self._created = int(time.time())

    async def start(self) -> None:
        """Listen."""
        self._server = await asyncio.start_server(self._serve_connection, self.config.host, self.config.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop open connections."""
        if self._server is not None:
            self._server.close()
            close_clients = getattr(self._server, "close_clients", None)  # Python ≥ 3.13
            if close_clients is not None:
                close_clients()
            await self._server.wait_closed()

    @property
    def url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.config.host}:{self.port}"

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    name, sep, value = line.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                arrived_s = asyncio.get_running_loop().time()
                await self._route(writer, method, path.split("?")[0], headers, body, arrived_s)
                if headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def _route(
        self,
        writer: asyncio.StreamWriter,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        arrived_s: float,
    ) -> None:
        if method == "GET" and path == "/v1/models":
            card = {"id": self.config.model, "object": "model", "created": self._created, "owned_by": "fake"}
            await _send_json(writer, 200, {"object": "list", "data": [card]})
        elif method == "GET" and path in ("/health", "/ready"):
            await _send_json(writer, 200, {"status": "ok"})
        elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            try:
                request = json.loads(body)
                assert isinstance(request, dict)
            except (ValueError, AssertionError):
                await _send_json(writer, 400, _error("the body is not a JSON object"))
                return
            chat = path.endswith("chat/completions")
            if self._slots is None:
                await self._generate(writer, request, headers, chat, arrived_s)
                return
            async with self._slots:
                await self._generate(writer, request, headers, chat, asyncio.get_running_loop().time())
        else:
            await _send_json(writer, 404, _error(f"no route {method} {path}"))

    def _plan(self, n: int, headers: dict[str, str], prompt: str) -> tuple[Schedule, int]:
        c = self.config
        schedule = c.slow if c.slow_every and n % c.slow_every == 0 else c.schedule
        status = c.fail_status if c.fail_every and n % c.fail_every == 0 else 200
        overrides = {
            k.removeprefix("x-fake-").replace("-", "_"): v
            for k, v in headers.items()
            if k.startswith("x-fake-")
        }
        overrides.update(parse_directive(prompt))
        status = int(overrides.pop("status", status))
        return with_overrides(schedule, overrides), status

    async def _generate(
        self,
        writer: asyncio.StreamWriter,
        request: dict[str, Any],
        headers: dict[str, str],
        chat: bool,
        t0: float,
    ) -> None:
        n = next(self._counter)
        self.num_requests = n
        if chat:
            messages = request.get("messages") or [{}]
            prompt = " ".join(str(m.get("content", "")) for m in messages)
            first = str(messages[-1].get("content", ""))  # the directive opens the last message
        else:
            prompt = request.get("prompt", "")
            prompt = first = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
        try:
            schedule, status = self._plan(n, headers, first)
        except ValueError as exc:
            await _send_json(writer, 400, _error(f"bad fake schedule: {exc}"))
            return
        if status != 200:
            await _send_json(writer, status, _error(f"fake failure of request {n}"))
            return
        self._num_inflight += 1
        self.max_seen_inflight = max(self.max_seen_inflight, self._num_inflight)
        try:
            await self._stream(writer, request, schedule, n, chat, t0, len(prompt.split()))
        finally:
            self._num_inflight -= 1

    async def _stream(
        self,
        writer: asyncio.StreamWriter,
        request: dict[str, Any],
        schedule: Schedule,
        n: int,
        chat: bool,
        t0: float,
        num_prompt_tokens: int,
    ) -> None:
        num_tokens = int(request.get("max_tokens") or request.get("max_completion_tokens") or 0)
        num_tokens = num_tokens or self.config.default_max_tokens
        usage = {
            "prompt_tokens": num_prompt_tokens,
            "completion_tokens": num_tokens,
            "total_tokens": num_prompt_tokens + num_tokens,
        }
        rid = f"{'chatcmpl' if chat else 'cmpl'}-fake-{n}"
        base = {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": self._created,
            "model": self.config.model,
        }
        loop = asyncio.get_running_loop()
        sizes = list(_chunk_sizes(num_tokens, schedule.tokens_per_chunk))
        if not request.get("stream"):
            await _sleep_until(loop, t0 + (schedule.ttft_ms + (len(sizes) - 1) * schedule.itl_ms) / 1e3)
            text = " tok" * num_tokens
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            object_name = "chat.completion" if chat else "text_completion"
            await _send_json(
                writer, 200, {**base, "object": object_name, "choices": [choice], "usage": usage}
            )
            return
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        if chat:
            _write_event(
                writer, {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
            )
        for j, size in enumerate(sizes):
            await _sleep_until(loop, t0 + (schedule.ttft_ms + j * schedule.itl_ms) / 1e3)
            last = j == len(sizes) - 1
            text = " tok" * size
            choice = {"index": 0, "finish_reason": "length" if last else None}
            choice.update({"delta": {"content": text}} if chat else {"text": text})
            _write_event(writer, {**base, "choices": [choice]})
            await writer.drain()
        stream_options = request.get("stream_options") or {}
        if stream_options.get("include_usage"):
            _write_event(writer, {**base, "choices": [], "usage": usage})
        writer.write(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
        await writer.drain()


_DIRECTIVE = re.compile(r"\[fake((?:\s+[a-z_]+=[-+0-9.eE]+)*)\s*\]")


def parse_directive(text: str) -> dict[str, str]:
    """Schedule overrides written at the start of a prompt: ``[fake ttft_ms=50 itl_ms=20]``.

    Keys: ``ttft_ms``, ``itl_ms``, ``tokens_per_chunk``, ``status``, and ``tag``
    (a number that names the request, ignored here). A fake worker behind a
    real router can read the same directive from the prompt.
    """
    match = _DIRECTIVE.match(text.lstrip())
    if match is None:
        return {}
    return dict(item.split("=", 1) for item in match.group(1).split())


def with_overrides(schedule: Schedule, overrides: dict[str, str]) -> Schedule:
    """``schedule`` with ``overrides`` (``ttft_ms``, ``itl_ms``, ``tokens_per_chunk``; ``tag`` is ignored).

    Raises:
        ValueError: an unknown key or a value that is not a number.
    """
    unknown = set(overrides) - {"ttft_ms", "itl_ms", "tokens_per_chunk", "tag"}
    if unknown:
        raise ValueError(
            f"unknown schedule keys {sorted(unknown)}: use ttft_ms, itl_ms, tokens_per_chunk, status"
        )
    values: dict[str, Any] = {k: float(v) for k, v in overrides.items() if k in ("ttft_ms", "itl_ms")}
    if "tokens_per_chunk" in overrides:
        values["tokens_per_chunk"] = max(1, int(overrides["tokens_per_chunk"]))
    return replace(schedule, **values)


def _chunk_sizes(num_tokens: int, per_chunk: int) -> Iterator[int]:
    while num_tokens > 0:
        yield min(per_chunk, num_tokens)
        num_tokens -= per_chunk


async def _sleep_until(loop: asyncio.AbstractEventLoop, deadline: float) -> None:
    delay = deadline - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)


def _write_event(writer: asyncio.StreamWriter, payload: dict[str, Any]) -> None:
    data = b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))


def _error(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "fake_error", "param": None, "code": None}}


async def _send_json(writer: asyncio.StreamWriter, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    reason = _REASONS.get(status, "Status")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()


def main(argv: list[str] | None = None) -> int:
    """``python -m pdserve.bench.fake_server``: serve until interrupted; prints the URL."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model", default="fake")
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--itl-ms", type=float, default=0.0)
    parser.add_argument("--tokens-per-chunk", type=int, default=1)
    parser.add_argument("--slow-every", type=int, default=0)
    parser.add_argument("--slow-ttft-ms", type=float, default=0.0)
    parser.add_argument("--slow-itl-ms", type=float, default=0.0)
    parser.add_argument("--fail-every", type=int, default=0)
    parser.add_argument("--fail-status", type=int, default=503)
    parser.add_argument("--max-inflight", type=int, default=0)
    args = parser.parse_args(argv)
    config = FakeServerConfig(
        host=args.host,
        port=args.port,
        model=args.model,
        schedule=Schedule(args.ttft_ms, args.itl_ms, args.tokens_per_chunk),
        slow_every=args.slow_every,
        slow=Schedule(args.slow_ttft_ms, args.slow_itl_ms, args.tokens_per_chunk),
        fail_every=args.fail_every,
        fail_status=args.fail_status,
        max_inflight=args.max_inflight,
    )

    async def serve() -> None:
        server = FakeServer(config)
        await server.start()
        print(f"fake OpenAI server on {server.url}", flush=True)  # the first line names the port
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
