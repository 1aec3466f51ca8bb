"""The soak test's load: streams of seeded streaming completions, some sharing a prefix, some dropped.

1. :func:`request_spec` draws one request (prompt, output length, whether the client
   drops it after a few chunks) from a seed, so runs are repeatable.
2. :func:`stream_one` sends it and counts the outcome in :class:`LoadCounters`.
3. :func:`load_stream` is one stream: requests back to back until the deadline or the
   request budget.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import string
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

SHARED_PREFIX_FRAC = 0.25
SHARED_PREFIX = "You are a careful assistant. Answer briefly and cite the page you used. " * 4  # 292 chars
MAX_ERROR_KINDS = 10




@dataclass(frozen=True)
class RequestSpec:
    """One request of the load: its prompt, output length and when (if ever) the client drops it."""

    prompt: str
    max_tokens: int
    abort_after_chunks: int | None  # None: read to the end


def request_spec(args: argparse.Namespace, stream: int, n: int) -> RequestSpec:
    """The n-th request of a stream; the same seed, stream and n give the same request."""
    rng = random.Random(f"{args.seed}/{stream}/{n}")
    num_chars = rng.randint(args.prompt_len[0], args.prompt_len[1])
    prefix = SHARED_PREFIX if rng.random() < SHARED_PREFIX_FRAC else ""
    words: list[str] = [prefix]
    length = len(prefix)
    while length < num_chars:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9)))
        words.append(word + " ")
        length += len(word) + 1
    prompt = "".join(words)[: max(num_chars, len(prefix) + 1)]
    max_tokens = rng.randint(args.output_len[0], args.output_len[1])
    abort = rng.randint(1, max(max_tokens // 2, 1)) if rng.random() < args.abort_frac else None
    return RequestSpec(prompt, max_tokens, abort)


@dataclass
class LoadCounters:
    """What the client saw, so far (only ever grows)."""

    num_sent: int = 0
    num_completed: int = 0  # read to [DONE] with usage.completion_tokens == max_tokens
    num_errors: int = 0
    num_aborted: int = 0  # dropped by the client on purpose (--abort-frac)
    num_cancelled: int = 0  # still running --stop-timeout after the load stopped
    num_completion_tokens: int = 0  # tokens of completed requests
    error_kinds: Counter[str] = field(default_factory=Counter)

    def error(self, message: str) -> None:
        self.num_errors += 1
        if len(self.error_kinds) < MAX_ERROR_KINDS or message in self.error_kinds:
            self.error_kinds[message] += 1


async def stream_one(client: httpx.AsyncClient, model: str, spec: RequestSpec, c: LoadCounters) -> None:
    """Stream one completion and count how it ended."""
    body = {
        "model": model, "prompt": spec.prompt, "max_tokens": spec.max_tokens, "temperature": 0.8,
        "seed": 7, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }
    c.num_sent += 1
    num_chunks = 0
    num_completion_tokens: int | None = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                c.error(f"HTTP {resp.status_code}: {(await resp.aread())[:120]!r}")
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    c.error(f"stream error: {str(chunk['error'])[:120]}")
                    return
                if chunk.get("choices"):
                    num_chunks += 1
                    if spec.abort_after_chunks is not None and num_chunks >= spec.abort_after_chunks:
                        c.num_aborted += 1
                        return  # leaving the block closes the connection: the router sees a disconnect
                if chunk.get("usage"):
                    num_completion_tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        c.error(f"{type(exc).__name__}: {str(exc)[:120]}")
        return
    if num_completion_tokens != spec.max_tokens:
        c.error(f"completion_tokens {num_completion_tokens} != max_tokens (ignore_eos)")
        return
    c.num_completed += 1
    c.num_completion_tokens += num_completion_tokens


async def load_stream(
    client: httpx.AsyncClient, args: argparse.Namespace, stream: int, deadline: float,
    stop: asyncio.Event, c: LoadCounters,
) -> None:
    """Requests back to back until the deadline, the request budget or a stop; then returns."""
    for n in range(args.max_requests):  # never more than the budget, whatever the clock does
        if time.monotonic() >= deadline or stop.is_set() or c.num_sent >= args.max_requests:
            return
        await stream_one(client, args.model, request_spec(args, stream, n), c)
