"""The fake server's schedule directive, shared with the router-overhead benchmark's fake worker."""

from __future__ import annotations

import pytest

from pdserve.bench.fake_server import Schedule, parse_directive, with_overrides


def test_directive_at_the_start_of_a_prompt() -> None:
    assert parse_directive("[fake ttft_ms=50 itl_ms=2.5] the rest") == {"ttft_ms": "50", "itl_ms": "2.5"}
    assert parse_directive("  [fake tokens_per_chunk=4]") == {"tokens_per_chunk": "4"}
    assert parse_directive("[fake]") == {}
    assert parse_directive("words first [fake ttft_ms=50]") == {}  # only at the start
    assert parse_directive("[fake ttft_ms=abc]") == {}  # not a number: not a directive


def test_overrides_apply_and_unknown_keys_are_refused() -> None:
    base = Schedule(ttft_ms=1, itl_ms=2, tokens_per_chunk=1)
    assert with_overrides(base, {"itl_ms": "7", "tokens_per_chunk": "3"}) == Schedule(1, 7, 3)
    assert with_overrides(base, {}) == base
    with pytest.raises(ValueError, match="unknown schedule keys"):
        with_overrides(base, {"speed": "1"})
