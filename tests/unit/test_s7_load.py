"""S7's loads and service SLO (benchmarks/s7_load.py): the goodput rule and the classic load unchanged."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from pdserve.bench.metrics import RequestRecord

_spec = importlib.util.spec_from_file_location(
    "s7_load", Path(__file__).resolve().parents[2] / "benchmarks" / "s7_load.py"
)
assert _spec is not None and _spec.loader is not None
s7 = importlib.util.module_from_spec(_spec)
sys.modules["s7_load"] = s7  # its dataclasses look their module up
_spec.loader.exec_module(s7)


def record(prompt: int, ttft: float, gaps: list[float]) -> RequestRecord:
    t = [ttft]
    for g in gaps:
        t.append(t[-1] + g)
    return RequestRecord(
        index=0,
        scheduled_s=0.0,
        sent_s=0.0,
        max_tokens=len(t),
        num_prompt_tokens=prompt,
        num_output_tokens=len(t),
        ttft_s=ttft,
        e2e_s=t[-1],
        chunk_s=t,
        chunk_tokens=[1] * len(t),
    )


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    s7.add_load_args(p)
    return s7.resolve_load_args(p.parse_args(list(argv)))


def test_each_request_is_judged_against_its_own_ttft_and_its_longest_gap() -> None:
    slo = s7.ServiceSLO(ttft_ms=1000, tpot_ms=50, ttft_per_token_ms=2.0, gap_ms=250)
    assert slo.ttft_limit_ms(1500) == 4000
    assert slo.met(record(1500, 3.5, [0.02] * 20))  # a document: 3.5 s is within 1 s + 2 ms x 1500
    assert not slo.met(record(100, 1.5, [0.02] * 20))  # a chat prompt: 1.5 s is not
    assert not slo.met(record(100, 0.2, [0.02] * 20 + [0.3]))  # one 300 ms stall, mean gap 33 ms
    flat = s7.ServiceSLO(ttft_ms=1000, tpot_ms=50)
    assert flat.met(record(100, 0.2, [0.02] * 20 + [0.3])) and not flat.met(record(1500, 3.5, [0.02]))


def test_the_rule() -> None:
    classic = s7.slo_rule(0.1, 0.0167, None, 1536, 200, "classic")
    assert classic == s7.ServiceSLO(1000.0, 50.1, 0.0, None)
    surge = s7.slo_rule(0.1, 0.0167, 0.868, 1536, 200, "surge")
    assert surge.ttft_per_token_ms == round(3 * 0.768 / 1336 * 1e3, 4) and surge.gap_ms == 250.5
    assert s7.ServiceSLO.parse("ttft_ms=1,tpot_ms=2,gap_ms=3") == s7.ServiceSLO(1, 2, 0.0, 3)


def test_the_first_runs_command_still_means_the_classic_load() -> None:
    args = parse("--phase-s", "180", "--chat-rate", "1.0", "--summary-rate", "0.25")
    assert s7.phases(args) == [[("chat", 1.0)], [("summarization", 0.25)], [("chat", 1.0)]]
    surge = parse("--load", "surge")
    assert s7.phases(surge) == [[("chat", 1.0)], [("chat", 0.5), ("summarization", 0.3)], [("chat", 1.0)]]
