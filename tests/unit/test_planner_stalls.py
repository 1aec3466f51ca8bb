"""Chunk step times fitted on a window's prefills (``pdserve.planner.stalls``) and the stalls they predict."""

from __future__ import annotations

import math
import random

import pytest

from pdserve.planner.stalls import ChunkFit, fit_chunks, stall_share

# bench-50m on one thread here (the profile's step model): ~20 ms a step, 0.55 ms a token,
# attention 0.28 µs a query-key pair (k = 0.14 µs per L²)
TRUE = ChunkFit(step_s=0.020, token_s=0.00055, pair_s=1.4e-7)
CHUNK = 256


def prefill_s(n: int, fit: ChunkFit = TRUE) -> float:
    return fit.step_s * math.ceil(n / CHUNK) + fit.token_s * n + fit.pair_s * n * n


def test_the_fit_recovers_the_step_token_and_attention_costs() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(40, 2500) for _ in range(30)]
    exact = fit_chunks([(n, prefill_s(n)) for n in lengths], CHUNK)
    assert exact is not None
    assert (exact.step_s, exact.token_s, exact.pair_s) == pytest.approx((0.020, 0.00055, 1.4e-7), rel=1e-6)
    # ±2 % noise on prefills of up to 1.5 s hides much of a 20 ms step cost, not the chunk times
    fit = fit_chunks([(n, prefill_s(n) * rng.uniform(0.98, 1.02)) for n in lengths], CHUNK)
    assert fit is not None
    for start in (0, 768, 2048):  # a first chunk, the last of a 1,024-token prompt, a late one
        assert fit.chunk_s(start, start + 256) == pytest.approx(TRUE.chunk_s(start, start + 256), rel=0.06)


def test_no_fit_from_too_few_prefills_or_one_length() -> None:
    assert fit_chunks([(n, prefill_s(n)) for n in (100, 500, 900, 1500, 2000)], CHUNK) is None
    assert fit_chunks([(400, prefill_s(400))] * 20, CHUNK) is None


def test_priced_per_chunk_step_short_chat_prompts_do_not_stall() -> None:
    # A chat window (prompts up to 600 tokens) on a busy mixed worker measures ~1,250 prompt tokens/s:
    # at that rate a 256-token chunk looks like 205 ms, past a 203 ms gap, and every prompt over one chunk
    # counted as stalling. Priced per chunk step it takes 0.020 + 0.14 + attention: only long prompts stall.
    rng = random.Random(1)
    chat = [rng.randint(60, 600) for _ in range(20)]
    rate_only = stall_share(0.3, chat, 1250.0, 0.0, 0.203, CHUNK, 0.0, 2.0)
    fitted = stall_share(0.3, chat, 1250.0, 0.0, 0.203, CHUNK, 0.0, 2.0, fit=TRUE)
    assert rate_only > 0.3 and fitted == 0.0
    documents = [2000, 2400, 2600]  # their late chunks attend to > 1,700 keys: 220+ ms
    assert TRUE.chunk_s(1744, 2000) > 0.203
    assert stall_share(0.3, documents, 1250.0, 0.0, 0.203, CHUNK, 0.0, 2.0, fit=TRUE) > 0.3


def test_a_blended_fit_moves_toward_the_new_window() -> None:
    old = ChunkFit(0.02, 0.0005, 1e-7)
    new = ChunkFit(0.04, 0.0007, 3e-7)
    mixed = new.blend(old, 0.25)
    assert mixed.step_s == pytest.approx(0.025) and mixed.token_s == pytest.approx(0.00055)
    assert mixed.pair_s == pytest.approx(1.5e-7)
