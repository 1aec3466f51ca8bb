"""Latency metrics of one request, and their aggregate over a run.

Per request (:class:`RequestRecord`), all times from the moment the request
was sent:

- TTFT: until the first chunk with content (a chat stream's opening
  ``role`` chunk with empty content does not count);
- ITL: gaps between consecutive content chunks. A chunk that carries k
  tokens counts as k tokens, each after gap / k (the gap is spread); the
  first chunk's extra tokens add no ITL (their wait is the TTFT);
- TPOT: (E2E − TTFT) / (output tokens − 1);
- E2E: until the response stream ended.

Output tokens come from the server's ``usage`` when it sends one, else from
the tool's tokenizer (``--tokenizer``), else one per content chunk. Tokens
per chunk come from per-chunk usage when the server reports it; otherwise
every chunk carries one token when the counts agree, else the tokens are
shared out in proportion to the chunks' text lengths (at least one each).

Aggregate (:func:`summarize`): mean / p50 / p90 / p95 / p99 of each metric
over the successful requests, throughputs over the measured window, and the
share of requests that met every SLO given (failures never do).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pdserve.errors import ConfigError

SLO_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
PERCENTILES = (50, 90, 95, 99)


@dataclass
class RequestRecord:
    """What happened to one request.

    Attributes:
        index: position in the run (warm-up requests included).
        warmup: sent during the warm-up (not in the aggregates).
        scheduled_s, sent_s: arrival time and actual send time, seconds from the run's start
            (they differ when ``--max-concurrency`` holds a request back or the client lags).
        ttft_s, e2e_s: see the module docstring; None when no content arrived.
        chunk_s: arrival time of each content chunk, seconds after ``sent_s``.
        chunk_tokens: tokens credited to each content chunk.
        num_prompt_tokens, num_output_tokens: the server's usage, or the tool's counts.
        num_cached_tokens: prompt tokens the server served from a prefix cache
            (``usage.prompt_tokens_details.cached_tokens``; None when not reported).
        token_source: ``usage``, ``tokenizer`` or ``chunks`` (where ``num_output_tokens`` came from).
        max_tokens: output tokens asked for.
        server_ttft_parts_s: the server's own TTFT breakdown (queue, prefill, transfer,
            delivery; seconds) when it sent one (pdserve with ``--trace-responses``).
        error_type: None on success, else a short class (``http_503``, ``timeout``, ``connect`` …).
        error: the error's text.
    """

    index: int
    warmup: bool = False
    scheduled_s: float = 0.0
    sent_s: float = 0.0
    ttft_s: float | None = None
    e2e_s: float | None = None
    chunk_s: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int | None = None
    token_source: str = "chunks"
    max_tokens: int = 0
    server_ttft_parts_s: dict[str, float] | None = None
    error_type: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Finished without error with at least one content chunk."""
        return self.error_type is None and self.ttft_s is not None

    @property
    def tpot_s(self) -> float | None:
        """(E2E − TTFT) / (output tokens − 1); None with fewer than two tokens."""
        if self.ttft_s is None or self.e2e_s is None or self.num_output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_output_tokens - 1)

    @property
    def itls_s(self) -> list[float]:
        """Inter-token latencies, each gap spread over the tokens of the chunk that ended it."""
        out: list[float] = []
        for i in range(1, len(self.chunk_s)):
            k = max(1, self.chunk_tokens[i] if i < len(self.chunk_tokens) else 1)
            out.extend([(self.chunk_s[i] - self.chunk_s[i - 1]) / k] * k)
        return out

    def to_json(self) -> dict[str, Any]:
        """A plain dict in milliseconds, for the result file."""
        d = asdict(self)
        for key in ("ttft_s", "e2e_s"):
            value = d.pop(key)
            d[key.replace("_s", "_ms")] = None if value is None else round(value * 1e3, 4)
        tpot = self.tpot_s
        d["tpot_ms"] = None if tpot is None else round(tpot * 1e3, 4)
        d["chunk_ms"] = [round(t * 1e3, 4) for t in d.pop("chunk_s")]
        d["itl_ms"] = [round(t * 1e3, 4) for t in self.itls_s]
        d["scheduled_s"], d["sent_s"] = round(self.scheduled_s, 6), round(self.sent_s, 6)
        return d


def spread_tokens(num_tokens: int, chunk_lengths: Sequence[int]) -> list[int]:
    """Tokens per chunk, in proportion to the chunks' text lengths, at least one each.

    The counts add up to ``num_tokens`` (largest remainders), except with fewer
    tokens than chunks: then every chunk keeps one (the server split its
    output finer than its tokens).
    """
    n = len(chunk_lengths)
    if num_tokens <= n or n == 0:
        return [1] * n
    total_chars = sum(chunk_lengths)
    shares = [num_tokens * c / total_chars for c in chunk_lengths] if total_chars else [num_tokens / n] * n
    counts = [max(1, math.floor(x)) for x in shares]
    remainders = [x - math.floor(x) for x in shares]
    left = num_tokens - sum(counts)
    if left > 0:
        for i in sorted(range(n), key=lambda i: remainders[i], reverse=True)[:left]:
            counts[i] += 1
    for i in sorted(range(n), key=lambda i: remainders[i]):  # the minimum of one overshot: take back
        if left >= 0:
            break
        if counts[i] > 1:
            counts[i] -= 1
            left += 1
    return counts


@dataclass(frozen=True)
class SLO:
    """Latency targets; a request is good when it meets every one given (None: not judged).

    ``itl_ms`` bounds the request's longest inter-token gap (a stall), ``tpot_ms`` its average.
    """

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    itl_ms: float | None = None
    e2e_ms: float | None = None

    @classmethod
    def parse(cls, spec: str | None) -> SLO:
        """``ttft_ms=500,tpot_ms=50`` (keys: ttft_ms, tpot_ms, itl_ms, e2e_ms)."""
        values: dict[str, float] = {}
        for part in (spec or "").split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in SLO_KEYS:
                raise ConfigError(f"SLO {part!r}: write KEY=MS with KEY one of {', '.join(SLO_KEYS)}")
            try:
                values[key] = float(value)
            except ValueError:
                raise ConfigError(f"SLO {part!r}: {value!r} is not a number of milliseconds") from None
            if values[key] <= 0:
                raise ConfigError(f"SLO {part!r}: the threshold must be > 0")
        return cls(**values)

    @property
    def given(self) -> dict[str, float]:
        """The thresholds that are set."""
        return {k: v for k in SLO_KEYS if (v := getattr(self, k)) is not None}

    def met(self, r: RequestRecord) -> bool:
        """Whether ``r`` succeeded and met every threshold given."""
        if not r.ok:
            return False
        assert r.ttft_s is not None and r.e2e_s is not None
        tpot, itls = r.tpot_s, r.itls_s
        checks = {
            "ttft_ms": r.ttft_s * 1e3,
            "tpot_ms": tpot * 1e3 if tpot is not None else 0.0,
            "itl_ms": max(itls) * 1e3 if itls else 0.0,
            "e2e_ms": r.e2e_s * 1e3,
        }
        return all(checks[k] <= limit for k, limit in self.given.items())


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation as ``numpy.percentile``; NaN when empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"q={q} must be in [0, 100]")
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution_ms(values_s: Sequence[float]) -> dict[str, float]:
    """count, mean, min, max and percentiles of times given in seconds, in milliseconds."""
    ms = [v * 1e3 for v in values_s]
    out = {"count": float(len(ms)), "mean": sum(ms) / len(ms) if ms else math.nan}
    out.update({f"p{q}": percentile(ms, q) for q in PERCENTILES})
    out["min"] = min(ms) if ms else math.nan
    out["max"] = max(ms) if ms else math.nan
    return out


@dataclass
class Summary:
    """Aggregates of one run (warm-up excluded)."""

    num_requests: int
    num_ok: int
    num_failed: int
    failures: dict[str, int]
    duration_s: float
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    num_prompt_tokens: int
    num_output_tokens: int
    num_short_outputs: int
    num_good: int
    goodput: float
    attainment: float
    slo: dict[str, float]
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    send_lag_ms: dict[str, float]
    server_ttft_parts_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    num_cached_tokens: int = 0  # prompt tokens served from the server's prefix caches (as reported)

    def to_json(self) -> dict[str, Any]:
        """A plain dict (NaN where a metric had no samples)."""
        return asdict(self)


def summarize(records: Sequence[RequestRecord], slo: SLO | None = None) -> Summary:
    """Aggregate the non-warm-up requests of a run.

    The window runs from the first measured send to the last measured end; a
    failed request without an end counts until its failure was noticed.
    """
    slo = slo or SLO()
    measured = [r for r in records if not r.warmup]
    ok = [r for r in measured if r.ok]
    starts = [r.sent_s for r in measured]
    ends = [r.sent_s + (r.e2e_s or 0.0) for r in measured]
    duration_s = max(ends) - min(starts) if measured else 0.0
    per_s = 1.0 / duration_s if duration_s > 0 else math.nan
    num_prompt = sum(r.num_prompt_tokens for r in ok)
    num_output = sum(r.num_output_tokens for r in ok)
    num_good = sum(slo.met(r) for r in measured)
    return Summary(
        num_requests=len(measured),
        num_ok=len(ok),
        num_failed=len(measured) - len(ok),
        failures=dict(Counter(r.error_type or "no_content" for r in measured if not r.ok)),
        duration_s=duration_s,
        request_throughput=len(ok) * per_s,
        output_throughput=num_output * per_s,
        total_token_throughput=(num_prompt + num_output) * per_s,
        num_prompt_tokens=num_prompt,
        num_output_tokens=num_output,
        num_short_outputs=sum(r.num_output_tokens < r.max_tokens for r in ok),
        num_good=num_good,
        goodput=num_good * per_s,
        attainment=num_good / len(measured) if measured else math.nan,
        slo=slo.given,
        ttft_ms=distribution_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_ms=distribution_ms([t for r in ok if (t := r.tpot_s) is not None]),
        itl_ms=distribution_ms([t for r in ok for t in r.itls_s]),
        e2e_ms=distribution_ms([r.e2e_s for r in ok if r.e2e_s is not None]),
        send_lag_ms=distribution_ms([r.sent_s - r.scheduled_s for r in measured]),
        server_ttft_parts_ms=_parts_ms(ok),
        num_cached_tokens=sum(r.num_cached_tokens or 0 for r in ok),
    )


def _parts_ms(records: Sequence[RequestRecord]) -> dict[str, dict[str, float]]:
    """Distribution of each part of the servers' TTFT breakdowns (empty when none was sent)."""
    traced = [r.server_ttft_parts_s for r in records if r.server_ttft_parts_s]
    parts = {part for b in traced for part in b}
    return {part: distribution_ms([b[part] for b in traced if part in b]) for part in sorted(parts)}
