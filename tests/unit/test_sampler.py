"""Sampler: greedy, temperature, top_k / top_p / min_p, seeds, min_tokens, logprobs."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch

from pdserve.engine.sampler import Sampler, _inverse_cdf, seeded_uniform
from pdserve.request import Request
from pdserve.sampling_params import SamplingParams


def make_request(
    params: SamplingParams, num_output_tokens: int = 0, eos: tuple[int, ...] = (), rid: str = "r"
) -> Request:
    request = Request(rid, [1, 2, 3], params, eos_token_ids=eos)
    for _ in range(num_output_tokens):
        request.append_token(0)
    return request


def sample_ids(sampler: Sampler, logits: torch.Tensor, requests: list[Request]) -> list[int]:
    return [s.token_id for s in sampler(logits, requests)]


def draw_many(logits_row: torch.Tensor, num_draws: int, **params: Any) -> list[int]:
    """One seeded draw per row: seeds 0..num_draws-1, the same logits in every row."""
    requests = [make_request(SamplingParams(seed=seed, **params)) for seed in range(num_draws)]
    return sample_ids(Sampler(), logits_row.expand(num_draws, -1).contiguous(), requests)


def chi_square(counts: Counter[int], probs: torch.Tensor, num_draws: int) -> float:
    expected = probs * num_draws
    return sum((counts.get(i, 0) - float(e)) ** 2 / float(e) for i, e in enumerate(expected) if e > 0)


# Critical values of the chi-square distribution at p = 0.001.
CHI2_CRITICAL = {5: 20.5, 7: 24.3}


@pytest.fixture
def flat_logits() -> torch.Tensor:
    return torch.randn(1000, generator=torch.Generator().manual_seed(0))


# --- greedy and its limits --------------------------------------------------------------


def test_greedy_is_argmax() -> None:
    logits = torch.randn(16, 1000, generator=torch.Generator().manual_seed(1))
    requests = [make_request(SamplingParams(temperature=0)) for _ in range(16)]
    assert sample_ids(Sampler(), logits, requests) == logits.argmax(-1).tolist()


def test_low_temperature_converges_to_greedy(flat_logits: torch.Tensor) -> None:
    logits = flat_logits.clone()
    logits[123] = logits.max() + 0.05  # a clear but small lead
    assert set(draw_many(logits, 200, temperature=1e-3)) == {123}
    # At temperature 1 the same logits are far from deterministic.
    assert len(set(draw_many(logits, 200, temperature=1.0))) > 50


@pytest.mark.parametrize("params", [{"top_k": 1}, {"top_p": 1e-6}, {"top_k": 1, "top_p": 0.5}])
def test_tight_filters_equal_greedy(flat_logits: torch.Tensor, params: dict[str, float]) -> None:
    assert set(draw_many(flat_logits, 200, temperature=1.5, **params)) == {int(flat_logits.argmax())}


# --- filters ----------------------------------------------------------------------------


def test_top_k_restricts_samples_to_the_top_k(flat_logits: torch.Tensor) -> None:
    top5 = set(flat_logits.topk(5).indices.tolist())
    assert set(draw_many(flat_logits, 1000, top_k=5)) == top5


def test_top_p_keeps_the_smallest_nucleus() -> None:
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()[[2, 0, 3, 1]]  # shuffled ids
    # 0.4 < 0.6 ≤ 0.4 + 0.3: the nucleus is {0.4, 0.3}, at ids 1 and 3.
    draws = draw_many(logits, 2000, top_p=0.6)
    assert set(draws) == {1, 3}
    assert Counter(draws)[1] / 2000 == pytest.approx(0.4 / 0.7, abs=0.04)


def test_top_p_applies_to_the_top_k_renormalised_distribution() -> None:
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    # Without top_k, 0.75 needs three tokens; within the top 3 (0.44, 0.33, 0.22) two.
    assert set(draw_many(logits, 2000, top_p=0.75)) == {0, 1, 2}
    assert set(draw_many(logits, 2000, top_k=3, top_p=0.75)) == {0, 1}


def test_top_k_renormalisation_holds_beside_larger_top_k() -> None:
    # Rows with different k share one top-k pass of the largest k: each row must
    # still renormalise over its own k tokens.
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.01, 0.01, 0.01, 0.01]).log()
    requests = [
        make_request(SamplingParams(seed=i, top_k=3 if i % 2 else 7, top_p=0.75)) for i in range(2000)
    ]
    ids = sample_ids(Sampler(), logits.expand(2000, -1), requests)
    assert set(ids[1::2]) == {0, 1}
    assert set(ids[0::2]) == {0, 1, 2}


@pytest.mark.parametrize("slope", [2.0, 0.3])  # nuclei of ~1300 and ~7000 tokens
def test_top_p_nucleus_wider_than_the_search_windows(slope: float) -> None:
    vocab = 8000
    gen = torch.Generator().manual_seed(2)
    ranked = -slope * torch.linspace(0, 1, vocab)  # descending logits
    permutation = torch.randperm(vocab, generator=gen)
    logits = torch.empty(vocab)
    logits[permutation] = ranked  # rank r sits at id permutation[r]
    cum = ranked.softmax(-1).cumsum(-1)
    nucleus_size = int((cum - ranked.softmax(-1) < 0.9).sum())
    rank_of = {int(token): rank for rank, token in enumerate(permutation)}

    ranks = [rank_of[t] for t in draw_many(logits, 2000, top_p=0.9)]
    assert max(ranks) < nucleus_size
    assert max(ranks) > 0.95 * nucleus_size  # reached the edge: not cut at a window
    assert nucleus_size > 512


@pytest.mark.parametrize("extra", [{}, {"top_k": 5}, {"top_p": 0.999}])
def test_min_p_excludes_tokens_below_min_p_times_the_top(extra: dict[str, float]) -> None:
    logits = torch.tensor([2.0, 1.9, 1.5, 0.0, -1.0, -3.0])
    # p / p_max = exp(logit - 2): 1, 0.90, 0.61, 0.14, 0.05, 0.007.
    assert set(draw_many(logits, 2000, min_p=0.3, **extra)) == {0, 1, 2}
    assert 3 in draw_many(logits, 2000, **extra)  # p ≈ 5 %: the filter did the work


# --- distributions ----------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sampling_matches_softmax(temperature: float) -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, 0.2, -1.0, 0.7])
    num_draws = 4000
    counts = Counter(draw_many(logits, num_draws, temperature=temperature))
    probs = (logits / temperature).softmax(-1)
    assert chi_square(counts, probs, num_draws) < CHI2_CRITICAL[7]
    # The test has power: twice the temperature is rejected.
    wrong = (logits / (2 * temperature)).softmax(-1)
    assert chi_square(counts, wrong, num_draws) > 3 * CHI2_CRITICAL[7]


def test_top_k_sampling_matches_the_renormalised_softmax() -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, 0.2, -1.0, 0.7])
    num_draws = 4000
    counts = Counter(draw_many(logits, num_draws, top_k=6))
    kept = logits.topk(6).indices
    probs = torch.zeros(8)
    probs[kept] = logits[kept].softmax(-1)
    assert set(counts) == set(kept.tolist())
    assert chi_square(counts, probs, num_draws) < CHI2_CRITICAL[5]


# --- seeds ------------------------------------------------------------------------------

SEEDED_PARAMS = [
    SamplingParams(seed=42),
    SamplingParams(seed=42, temperature=0.7, top_k=50),
    SamplingParams(seed=42, temperature=1.3, top_p=0.9),
    SamplingParams(seed=-7, min_p=0.2),
    SamplingParams(seed=2**64 - 1, top_k=20, top_p=0.8, min_p=0.01),
]
NEIGHBOURS = [
    SamplingParams(),
    SamplingParams(temperature=0),
    SamplingParams(seed=1, top_k=3),
    SamplingParams(top_p=0.5),
    SamplingParams(seed=9, min_p=0.1, logprobs=2),
    SamplingParams(temperature=0, logprobs=0, min_tokens=3),
]


@pytest.mark.parametrize("params", SEEDED_PARAMS, ids=range(len(SEEDED_PARAMS)))
@pytest.mark.parametrize("k", [0, 5])
def test_seeded_row_ignores_batch_and_position(
    flat_logits: torch.Tensor, params: SamplingParams, k: int
) -> None:
    gen = torch.Generator().manual_seed(3)
    target = make_request(params, num_output_tokens=k)
    alone = sample_ids(Sampler(seed=0), flat_logits[None], [target])[0]

    for batch_size in (2, 7, 64):
        for position in (0, batch_size // 2, batch_size - 1):
            logits = torch.randn(batch_size, 1000, generator=gen)
            logits[position] = flat_logits
            requests = [
                make_request(NEIGHBOURS[i % len(NEIGHBOURS)], num_output_tokens=i % 3)
                for i in range(batch_size)
            ]
            requests[position] = target
            ids = sample_ids(Sampler(seed=batch_size + position), logits, requests)
            assert ids[position] == alone, (batch_size, position)


def test_seeded_request_resumed_elsewhere_continues_identically(
    flat_logits: torch.Tensor,
) -> None:
    params = SamplingParams(seed=5, top_k=100)
    original = make_request(params)
    tokens = []
    for _ in range(8):
        token = sample_ids(Sampler(seed=0), flat_logits[None], [original])[0]
        original.append_token(token)
        tokens.append(token)
    # Another worker rebuilds the request from its first 5 tokens, with its own sampler.
    resumed = make_request(params)
    for token in tokens[:5]:
        resumed.append_token(token)
    other_worker = Sampler(seed=99)
    for expected in tokens[5:]:
        token = sample_ids(other_worker, flat_logits[None], [resumed])[0]
        resumed.append_token(token)
        assert token == expected


def test_different_token_index_gives_different_noise(flat_logits: torch.Tensor) -> None:
    params = SamplingParams(seed=42)
    requests = [make_request(params, num_output_tokens=k) for k in range(40)]
    ids = sample_ids(Sampler(), flat_logits.expand(40, -1), requests)
    assert len(set(ids)) > 30
    assert len({seeded_uniform(42, k) for k in range(1000)}) == 1000


def test_unseeded_rows_vary_and_follow_the_sampler_seed(flat_logits: torch.Tensor) -> None:
    requests = [make_request(SamplingParams()) for _ in range(40)]
    logits = flat_logits.expand(40, -1)
    sampler = Sampler(seed=0)
    first, second = sample_ids(sampler, logits, requests), sample_ids(sampler, logits, requests)
    assert len(set(first)) > 30
    assert first != second
    assert sample_ids(Sampler(seed=0), logits, requests) == first
    assert sample_ids(Sampler(seed=1), logits, requests) != first


def test_seeded_uniform_is_a_deterministic_unit_interval_hash() -> None:
    values = [seeded_uniform(seed, k) for seed in (0, 1, -2, 2**63, 2**64 - 1) for k in range(50)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert len(set(values)) == len(values)
    assert seeded_uniform(123, 4) == seeded_uniform(123, 4)
    assert seeded_uniform(-1, 4) == seeded_uniform(2**64 - 1, 4)  # seeds are taken mod 2**64
    assert abs(sum(seeded_uniform(7, k) for k in range(10000)) / 10000 - 0.5) < 0.01


def test_inverse_cdf_never_picks_a_zero_weight_token() -> None:
    weights = torch.tensor([[0.0, 0.0, 0.5, 0.0, 0.25, 0.0, 0.0]]).expand(4, -1)
    u = torch.tensor([0.0, 0.5, 0.99999994, 1.0])  # 1.0 is out of contract: the guard
    assert _inverse_cdf(weights.cumsum(-1), u).tolist() == [2, 2, 4, 4]
    assert _inverse_cdf(weights.cumsum(-1), torch.full((4,), 0.7)).tolist() == [4] * 4


# --- min_tokens -------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_masks_eos_and_stop_token_ids(temperature: float) -> None:
    logits = torch.zeros(1, 10)
    logits[0, 3] = 50.0  # EOS dominates
    logits[0, 7] = 49.0  # then the stop token
    logits[0, 5] = 10.0
    params = SamplingParams(temperature=temperature, min_tokens=2, stop_token_ids=[7], seed=0)
    sampler = Sampler()
    for k in (0, 1):
        assert sample_ids(sampler, logits, [make_request(params, k, eos=(3,))]) == [5]
    assert sample_ids(sampler, logits, [make_request(params, 2, eos=(3,))]) == [3]


def test_ignore_eos_leaves_eos_sampleable() -> None:
    logits = torch.zeros(1, 10)
    logits[0, 3] = 50.0
    params = SamplingParams(temperature=0, ignore_eos=True)
    assert sample_ids(Sampler(), logits, [make_request(params, eos=(3,))]) == [3]


# --- logprobs ---------------------------------------------------------------------------


def test_logprobs_come_from_the_raw_logits(flat_logits: torch.Tensor) -> None:
    logits = torch.stack([flat_logits, flat_logits.flip(0), flat_logits * 2])
    requests = [
        make_request(SamplingParams(temperature=0.5, top_k=10, logprobs=3, seed=1)),
        make_request(SamplingParams(temperature=0, logprobs=0)),
        make_request(SamplingParams(seed=3)),
    ]
    results = Sampler()(logits, requests)
    reference = torch.log_softmax(logits, dim=-1)

    first = results[0].logprobs
    assert first is not None and first.token_id == results[0].token_id
    assert first.logprob == pytest.approx(float(reference[0, first.token_id]), abs=1e-5)
    top3 = reference[0].topk(3)
    assert list(first.top) == top3.indices.tolist()
    assert list(first.top.values()) == pytest.approx(top3.values.tolist(), abs=1e-5)
    # Raw, not temperature-scaled: the scaled distribution is sharper.
    scaled = torch.log_softmax(logits[0] / 0.5, dim=-1)
    assert first.logprob != pytest.approx(float(scaled[first.token_id]), abs=1e-3)

    second = results[1].logprobs
    assert second is not None and second.top == {}
    assert second.logprob == pytest.approx(float(reference[1].max()), abs=1e-5)
    assert results[2].logprobs is None


def test_logprobs_ignore_the_min_tokens_mask() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    params = SamplingParams(temperature=0, min_tokens=1, logprobs=1)
    [result] = Sampler()(logits, [make_request(params, eos=(1,))])
    assert result.token_id == 2
    assert result.logprobs is not None
    assert result.logprobs.top == pytest.approx({1: float(torch.log_softmax(logits, -1)[0, 1])})


# --- batches ----------------------------------------------------------------------------


def test_mixed_batch(flat_logits: torch.Tensor) -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 1000, generator=gen) * 3
    requests = [
        make_request(SamplingParams(temperature=0)),
        make_request(SamplingParams(top_k=4, seed=1)),
        make_request(SamplingParams(temperature=0, logprobs=2)),
        make_request(SamplingParams(top_p=0.3, min_p=0.05)),
        make_request(SamplingParams(temperature=0.8, seed=7, logprobs=1)),
        make_request(SamplingParams(temperature=0, min_tokens=1), eos=(int(logits[5].argmax()),)),
    ]
    results = Sampler()(logits, requests)
    ids = [r.token_id for r in results]
    assert ids[0] == int(logits[0].argmax())
    assert ids[1] in logits[1].topk(4).indices.tolist()
    assert ids[2] == int(logits[2].argmax())
    assert ids[5] == int(logits[5].topk(2).indices[1])
    assert [r.logprobs is not None for r in results] == [0, 0, 1, 0, 1, 0]
    for i in (1, 4):  # seeded rows: the same token alone
        assert ids[i] == sample_ids(Sampler(), logits[i : i + 1], [requests[i]])[0]


def test_half_precision_logits(flat_logits: torch.Tensor) -> None:
    logits = flat_logits.to(torch.bfloat16).expand(3, -1)
    requests = [
        make_request(SamplingParams(temperature=0)),
        make_request(SamplingParams(seed=1, top_p=0.9)),
        make_request(SamplingParams(seed=1, min_p=0.1, logprobs=1)),
    ]
    ids = sample_ids(Sampler(), logits, requests)
    assert ids[0] == int(logits[0].argmax())
    assert all(0 <= i < 1000 for i in ids)


def test_empty_batch_and_shape_mismatch() -> None:
    assert Sampler()(torch.zeros(0, 10), []) == []
    with pytest.raises(ValueError, match="num_requests=2"):
        Sampler()(torch.zeros(3, 10), [make_request(SamplingParams())] * 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_seeded_rows(flat_logits: torch.Tensor) -> None:
    requests = [make_request(p, num_output_tokens=2) for p in SEEDED_PARAMS]
    logits = flat_logits.expand(len(requests), -1).contiguous()
    cpu = sample_ids(Sampler(), logits, requests)
    assert sample_ids(Sampler(), logits.cuda(), requests) == cpu
    greedy = [make_request(SamplingParams(temperature=0))] * 2
    assert sample_ids(Sampler(), logits[:2].cuda(), greedy) == [int(flat_logits.argmax())] * 2
