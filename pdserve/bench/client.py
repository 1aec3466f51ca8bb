"""One streamed request to an OpenAI-compatible server, timed chunk by chunk.

Lifecycle of a request (:meth:`BenchClient.send`):

1. Build the body: ``stream: true``, ``stream_options.include_usage`` (and
   vLLM's ``continuous_usage_stats``, which other servers ignore), ``max_tokens``
   and, unless turned off, ``ignore_eos`` so the output is as long as asked.
2. POST, and read the body as it arrives; every ``data:`` event is parsed,
   content chunks are timestamped on arrival. Times run from the moment the
   request got a connection (httpcore's first trace event: connecting, or
   writing the request on a kept-alive connection), so the client's own
   request building (~0.5 ms in httpx) is not counted as server latency.
3. ``data: [DONE]`` (or the end of the body) ends the request; the usage
   chunk gives the token counts. Any failure — HTTP status, error event,
   time-out, dropped connection, no content — is classified in
   :attr:`RequestRecord.error_type` instead of raised.

httpx clients serve the requests of a run with as many keep-alive
connections as the run may have requests in flight, spread over several
clients of at most ``CONNECTIONS_PER_CLIENT`` (see :class:`BenchClient`).
"""

from __future__ import annotations

import math
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec

from pdserve.bench.metrics import RequestRecord, spread_tokens
from pdserve.bench.workload import RequestSpec, TokenCounter
from pdserve.errors import ConfigError

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
_json_decode = msgspec.json.Decoder().decode
_json_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class ClientConfig:
    """How to talk to the server.

    Attributes:
        base_url: ``http://HOST:PORT`` (a trailing ``/v1`` is accepted).
        model: the ``model`` field of each request.
        endpoint: ``completions`` or ``chat``.
        ignore_eos: send ``ignore_eos: true`` (vLLM/pdserve extension) so outputs reach ``max_tokens``.
        extra_body: more fields merged into every request body (e.g. ``temperature``).
        headers: extra HTTP headers (an ``Authorization`` header for keyed servers).
        timeout_s: per-request limit on connecting and on each read.
        max_connections: size of the connection pool.
    """

    base_url: str
    model: str
    endpoint: str = "completions"
    ignore_eos: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 600.0
    max_connections: int = 1024

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ConfigError(f"endpoint {self.endpoint!r}: use one of {', '.join(ENDPOINTS)}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base URL {self.base_url!r} must start with http:// or https://")
        if self.max_connections < 1:
            raise ConfigError(f"max_connections must be ≥ 1, got {self.max_connections}")

    @property
    def root_url(self) -> str:
        """The base URL without a trailing ``/`` or ``/v1``."""
        return self.base_url.rstrip("/").removesuffix("/v1")

    @property
    def url(self) -> str:
        """The endpoint's full URL."""
        return self.root_url + ENDPOINTS[self.endpoint]

    def body(self, spec: RequestSpec) -> dict[str, Any]:
        """The JSON body of one request."""
        body: dict[str, Any] = {"model": self.model, "max_tokens": spec.max_tokens, "stream": True}
        if self.endpoint == "chat":
            body["messages"] = spec.chat_messages()
        else:
            body["prompt"] = spec.prompt()
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        if self.ignore_eos:
            body["ignore_eos"] = True
        body.update(self.extra_body)
        return body


#: Connections per httpx client. httpcore scans every connection of its pool on each request and
#: response (and squares the count of idle ones): past a few dozen connections that scan costs more
#: CPU than the request. Measured on 2 cores: 32 connections in one client, 204 req/s; in 8 clients
#: of 4, 486 req/s (see docs/bench.md).
CONNECTIONS_PER_CLIENT = 4


def make_http_client(
    config: ClientConfig, max_connections: int | None = None, ssl_context: ssl.SSLContext | None = None
) -> httpx.AsyncClient:
    """An httpx client with ``max_connections`` keep-alive connections and no pool wait limit."""
    n = max_connections or config.max_connections
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    timeout = httpx.Timeout(config.timeout_s, pool=None)
    verify: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
    return httpx.AsyncClient(limits=limits, timeout=timeout, headers=config.headers, verify=verify)


class StreamError(Exception):
    """The server reported an error inside the stream."""


class BenchClient:
    """Sends requests and times them (see the module docstring); use as ``async with``.

    It spreads requests over ``ceil(max_connections / CONNECTIONS_PER_CLIENT)``
    httpx clients, each request to the one with the fewest in flight.
    """

    def __init__(self, config: ClientConfig, counter: TokenCounter | None = None) -> None:
        self.config = config
        self.counter = counter  # a tokenizer's counts when the server sends no usage
        num_clients = math.ceil(config.max_connections / CONNECTIONS_PER_CLIENT)
        per_client = math.ceil(config.max_connections / num_clients)
        ssl_context = httpx.create_ssl_context()  # one for all: each takes ~40 ms to build
        self._clients = [make_http_client(config, per_client, ssl_context) for _ in range(num_clients)]
        self._num_inflight = [0] * num_clients
        self._text_key = "text" if config.endpoint == "completions" else "delta"

    async def __aenter__(self) -> BenchClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection."""
        for client in self._clients:
            await client.aclose()

    async def send(self, spec: RequestSpec, record: RequestRecord, run_start_s: float) -> RequestRecord:
        """Send ``spec`` now and fill ``record`` (times relative to ``run_start_s``, a perf_counter value)."""
        i = min(range(len(self._clients)), key=self._num_inflight.__getitem__)
        self._num_inflight[i] += 1
        try:
            return await self._send(self._clients[i], spec, record, run_start_s)
        finally:
            self._num_inflight[i] -= 1

    async def _send(
        self, http: httpx.AsyncClient, spec: RequestSpec, record: RequestRecord, run_start_s: float
    ) -> RequestRecord:
        record.max_tokens = spec.max_tokens
        record.num_prompt_tokens = spec.num_prompt_tokens
        content = _json_encode(self.config.body(spec))
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        texts: list[str] = []
        usage_tokens: list[int | None] = []  # completion_tokens after each content chunk, if reported
        usage: dict[str, Any] | None = None
        marks: list[float] = []

        async def on_wire(event: str, info: dict[str, Any]) -> None:
            if not marks:  # the first is connect_tcp (new connection) or send_request_headers
                marks.append(time.perf_counter())

        t0 = time.perf_counter()
        record.sent_s = t0 - run_start_s
        done = False
        try:
            async with http.stream(
                "POST", self.config.url, content=content, headers=headers, extensions={"trace": on_wire}
            ) as resp:
                if marks:  # time from here on, not from before httpx built the request
                    t0 = marks[0]
                    record.sent_s = t0 - run_start_s
                if resp.status_code != 200:
                    body = (await resp.aread()).decode("utf-8", "replace")
                    return _fail(record, f"http_{resp.status_code}", body[:500], t0)
                pending = b""
                data_lines: list[bytes] = []
                async for raw in resp.aiter_bytes():
                    if done:
                        continue  # read to the end of the body so that the connection is kept alive
                    now = time.perf_counter() - t0
                    lines = (pending + raw).split(b"\n")
                    pending = lines.pop()
                    for line in lines:
                        line = line.rstrip(b"\r")
                        if line.startswith(b"data:"):
                            data_lines.append(line[5:].lstrip(b" "))
                            continue
                        if line or not data_lines:
                            continue  # comments, other fields, stray blank lines
                        data = b"\n".join(data_lines)
                        data_lines = []
                        if data == b"[DONE]":
                            done = True
                            record.e2e_s = now
                            break
                        chunk = _json_decode(data)
                        if "error" in chunk and not chunk.get("choices"):
                            raise StreamError(str(chunk["error"])[:500])
                        text = self._content(chunk)
                        if chunk.get("pdserve_trace"):
                            record.server_ttft_parts_s = _ttft_parts(chunk["pdserve_trace"])
                        if chunk.get("usage"):
                            usage = chunk["usage"]
                        if text:
                            texts.append(text)
                            record.chunk_s.append(now)
                            usage_tokens.append(usage.get("completion_tokens") if usage else None)
                if not done:
                    record.e2e_s = time.perf_counter() - t0
        except StreamError as exc:
            return _fail(record, "stream_error", str(exc), t0)
        except httpx.TimeoutException as exc:
            return _fail(record, "timeout", repr(exc), t0)
        except httpx.ConnectError as exc:
            return _fail(record, "connect", repr(exc), t0)
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            return _fail(record, "disconnected", repr(exc), t0)
        except msgspec.DecodeError as exc:
            return _fail(record, "bad_event", repr(exc), t0)
        except httpx.HTTPError as exc:
            return _fail(record, type(exc).__name__, repr(exc), t0)
        except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:  # a malformed chunk
            return _fail(record, "bad_event", repr(exc), t0)
        if not texts:
            return _fail(record, "no_content", "the stream ended without any content", t0)
        record.ttft_s = record.chunk_s[0]
        self._count_tokens(record, texts, usage_tokens, usage)
        if not done:
            record.error_type, record.error = "incomplete", "the stream ended without data: [DONE]"
        return record

    def _content(self, chunk: dict[str, Any]) -> str:
        """The text of a chunk's first choice (chat: content, or reasoning content)."""
        choices = chunk.get("choices")
        if not choices:
            return ""
        choice = choices[0]
        if self._text_key == "text":
            return choice.get("text") or ""
        delta = choice.get("delta") or {}
        return delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") or ""

    def _count_tokens(
        self,
        record: RequestRecord,
        texts: list[str],
        usage_tokens: list[int | None],
        usage: dict[str, Any] | None,
    ) -> None:
        if usage and isinstance(usage.get("completion_tokens"), int):
            record.num_output_tokens = usage["completion_tokens"]
            if isinstance(usage.get("prompt_tokens"), int):
                record.num_prompt_tokens = usage["prompt_tokens"]
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                record.num_cached_tokens = details["cached_tokens"]
            record.token_source = "usage"
        elif self.counter is not None:
            record.num_output_tokens = self.counter.count("".join(texts))
            record.token_source = "tokenizer"
        else:
            record.num_output_tokens = len(texts)
            record.token_source = "chunks"
        reported = [u for u in usage_tokens if u is not None]
        if len(reported) == len(usage_tokens):  # per-chunk usage: exact tokens per chunk
            counts = [u - prev for u, prev in zip(reported, [0, *reported[:-1]], strict=True)]
            if all(c >= 1 for c in counts):
                record.chunk_tokens = counts
                return
        record.chunk_tokens = spread_tokens(record.num_output_tokens, [len(t) for t in texts])


def _ttft_parts(traces: Any) -> dict[str, float] | None:
    """The four TTFT parts of a pdserve trace (``pdserve_trace[0].ttft_breakdown``), if well formed."""
    try:
        breakdown = traces[0]["ttft_breakdown"]
        return {part: float(breakdown[f"{part}_s"]) for part in ("queue", "prefill", "transfer", "delivery")}
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _fail(record: RequestRecord, error_type: str, message: str, t0: float) -> RequestRecord:
    record.error_type, record.error = error_type, message
    record.e2e_s = time.perf_counter() - t0
    return record


async def discover_model(http: httpx.AsyncClient, root_url: str) -> str:
    """The first model the server lists at ``/v1/models``."""
    try:
        resp = await http.get(root_url + "/v1/models")
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"cannot list the models of {root_url} ({exc!r}); give --model") from exc
