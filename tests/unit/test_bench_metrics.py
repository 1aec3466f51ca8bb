"""Per-request metrics, SLOs and aggregates of ``pdserve bench`` on hand-made records."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pdserve.bench.metrics import SLO, RequestRecord, percentile, spread_tokens, summarize
from pdserve.errors import ConfigError


def record(index: int, ttft_ms: float, itl_ms: float, num_tokens: int, sent_s: float = 0.0) -> RequestRecord:
    """A successful request with one token per chunk on a fixed schedule."""
    chunks = [(ttft_ms + j * itl_ms) / 1e3 for j in range(num_tokens)]
    return RequestRecord(
        index=index, sent_s=sent_s, scheduled_s=sent_s, ttft_s=chunks[0], e2e_s=chunks[-1],
        chunk_s=chunks, chunk_tokens=[1] * num_tokens, num_prompt_tokens=10, num_output_tokens=num_tokens,
        token_source="usage", max_tokens=num_tokens,
    )  # fmt: skip


def test_itl_tpot_of_a_regular_stream() -> None:
    r = record(0, ttft_ms=50, itl_ms=20, num_tokens=6)
    assert r.itls_s == pytest.approx([0.020] * 5)
    assert r.tpot_s == pytest.approx(0.020)
    assert r.ok


def test_a_chunk_of_k_tokens_spreads_its_gap() -> None:
    r = RequestRecord(index=0, ttft_s=0.05, e2e_s=0.09, chunk_s=[0.05, 0.07, 0.09], chunk_tokens=[1, 4, 2],
                      num_output_tokens=7)  # fmt: skip
    assert r.itls_s == pytest.approx([0.005] * 4 + [0.01] * 2)
    assert r.tpot_s == pytest.approx(0.04 / 6)


def test_spread_tokens() -> None:
    assert spread_tokens(3, [4, 4, 4]) == [1, 1, 1]
    assert spread_tokens(12, [4, 4, 4]) == [4, 4, 4]
    assert spread_tokens(10, [4, 12, 24]) == [1, 3, 6]  # by text length
    assert spread_tokens(10, [1, 1, 98]) == [1, 1, 8]  # at least one each
    assert spread_tokens(2, [5, 5, 5]) == [1, 1, 1]  # fewer tokens than chunks: one each
    assert sum(spread_tokens(101, [3, 7, 11, 2])) == 101
    assert spread_tokens(5, []) == []


def test_slo_parsing_and_errors() -> None:
    assert SLO.parse("ttft_ms=500, tpot_ms=50").given == {"ttft_ms": 500.0, "tpot_ms": 50.0}
    assert SLO.parse(None).given == {}
    for bad, match in [("ttft=5", "ttft_ms, tpot_ms"), ("ttft_ms=fast", "not a number"), ("e2e_ms=0", "> 0")]:
        with pytest.raises(ConfigError, match=match):
            SLO.parse(bad)


def test_slo_needs_every_threshold_and_success() -> None:
    slo = SLO(ttft_ms=100, tpot_ms=25)
    assert slo.met(record(0, 90, 20, 5))
    assert not slo.met(record(0, 110, 20, 5))  # TTFT missed
    assert not slo.met(record(0, 90, 30, 5))  # TPOT missed
    failed = record(0, 90, 20, 5)
    failed.error_type = "disconnected"
    assert not slo.met(failed)
    stall = record(0, 10, 10, 10)
    stall.chunk_s[5] += 0.04  # one 50 ms gap in a stream of 10 ms gaps
    assert SLO(itl_ms=30).met(record(0, 10, 10, 10)) and not SLO(itl_ms=30).met(stall)


def test_percentile_matches_numpy() -> None:
    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0]
    for q in (0, 25, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert math.isnan(percentile([], 50))


def test_summary_hand_computed() -> None:
    # 8 requests sent 0.1 s apart: every 4th has a 200 ms TTFT, one more fails; warm-up excluded
    records = []
    for i in range(8):
        r = record(i, ttft_ms=200 if i % 4 == 3 else 50, itl_ms=10, num_tokens=11, sent_s=0.1 * i)
        records.append(r)
    records[5].error_type, records[5].error = "http_503", "busy"
    warm = record(99, 5000, 500, 3, sent_s=-5.0)
    warm.warmup = True
    s = summarize([warm, *records], SLO(ttft_ms=100, tpot_ms=20))
    assert s.num_requests == 8 and s.num_ok == 7 and s.num_failed == 1
    assert s.failures == {"http_503": 1}
    # window: first send 0.0 → last end 0.7 + 0.2 + 0.1 = 1.0 s
    assert s.duration_s == pytest.approx(1.0)
    assert s.num_good == 5  # 8 − 2 slow − 1 failed
    assert s.attainment == pytest.approx(5 / 8)
    assert s.goodput == pytest.approx(5.0)
    assert s.request_throughput == pytest.approx(7.0)
    assert s.output_throughput == pytest.approx(77.0)
    assert s.total_token_throughput == pytest.approx(77.0 + 70.0)
    assert s.ttft_ms["p50"] == pytest.approx(50.0)
    assert s.ttft_ms["max"] == pytest.approx(200.0)
    assert s.tpot_ms["mean"] == pytest.approx(10.0)
    assert s.itl_ms["count"] == 70


def test_server_ttft_breakdowns_are_summarised_when_sent() -> None:
    records = [record(i, ttft_ms=50, itl_ms=10, num_tokens=3, sent_s=0.1 * i) for i in range(3)]
    assert summarize(records).server_ttft_parts_ms == {}  # a server that sends none
    for i, r in enumerate(records[:2]):
        r.server_ttft_parts_s = {"queue": 0.001 * (i + 1), "prefill": 0.03, "transfer": 0.0}
        r.server_ttft_parts_s["delivery"] = 0.002
    parts = summarize(records).server_ttft_parts_ms
    assert sorted(parts) == ["delivery", "prefill", "queue", "transfer"]
    assert parts["queue"]["count"] == 2 and parts["queue"]["mean"] == pytest.approx(1.5)
    assert parts["prefill"]["p50"] == pytest.approx(30.0)
