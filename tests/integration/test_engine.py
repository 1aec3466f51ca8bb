"""The engine on the tiny preset: prefix cache, seeded sampling, stops, bad input, no leaks."""

from __future__ import annotations

import pytest

from pdserve import LLM, SamplingParams
from pdserve.config import Role
from pdserve.engine.llm import make_engine_config
from pdserve.errors import ConfigError, InvalidRequestError, ModelLoadError
from pdserve.model.loader import load_model


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("tiny", block_size=16)


def assert_no_blocks_used(llm: LLM) -> None:
    stats = llm.engine.block_manager.stats()
    assert stats.num_used_blocks == 0 and stats.num_held_requests == 0


def test_prefix_cache_reuses_three_blocks_and_gives_identical_output() -> None:
    shared = [5 + (i % 200) for i in range(48)]  # exactly three 16-token blocks
    first, second = [*shared, 7, 8, 9], [*shared, 11, 12]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    cached = LLM("tiny", block_size=16)
    cached.generate([first], params)
    before = cached.engine.block_manager.stats()
    out = cached.generate([second], params)[0]
    after = cached.engine.block_manager.stats()
    assert after.prefix_hit_tokens - before.prefix_hit_tokens == 48
    assert out.num_cached_tokens == 48
    assert cached.engine.num_prompt_tokens_computed == len(first) + len(second) - 48
    uncached = LLM("tiny", block_size=16, enable_prefix_caching=False)
    assert uncached.generate([second], params)[0].token_ids == out.token_ids
    assert_no_blocks_used(cached)


def test_seeded_sampling_is_independent_of_the_batch(llm: LLM) -> None:
    target = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=42, ignore_eos=True)
    alone = llm.generate(["seeded prompt"], target)[0].token_ids
    neighbours = [
        ("another prompt entirely", SamplingParams(max_tokens=5, temperature=0.7, seed=1)),
        ("x" * 70, SamplingParams(max_tokens=30, temperature=1.3)),
        ("greedy one", SamplingParams(max_tokens=10, temperature=0.0)),
    ]
    for i in range(len(neighbours) + 1):
        batch = [*neighbours[:i], ("seeded prompt", target), *neighbours[i:]]
        outs = llm.generate([p for p, _ in batch], [sp for _, sp in batch])
        assert outs[i].token_ids == alone
    other_seed = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=43, ignore_eos=True)
    assert llm.generate(["seeded prompt"], other_seed)[0].token_ids != alone
    assert_no_blocks_used(llm)


def test_stop_string_truncates_text(llm: LLM) -> None:
    free = llm.generate(["stop here"], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0]
    assert len(free.text) >= 6
    stop = free.text[3:6]
    out = llm.generate(["stop here"], SamplingParams(max_tokens=20, temperature=0.0, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[: free.text.index(stop)]


def test_max_tokens_and_eos(llm: LLM) -> None:
    out = llm.generate(["abc"], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
    target = out.token_ids[-1]
    params = SamplingParams(max_tokens=5, temperature=0.0, stop_token_ids=[target])
    stopped = llm.generate(["abc"], params)[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == target
    assert stopped.token_ids == out.token_ids[: out.token_ids.index(target) + 1]


def test_logprobs_are_returned(llm: LLM) -> None:
    out = llm.generate(["logprobs"], SamplingParams(max_tokens=4, temperature=0.0, logprobs=3))[0]
    assert len(out.logprobs) == len(out.token_ids)
    for token, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp.token_id == token and lp.logprob <= 0 and len(lp.top) >= 3
        assert max(lp.top.values()) == pytest.approx(lp.logprob)  # greedy takes the top token


def test_prompt_longer_than_max_model_len_is_rejected() -> None:
    small = LLM("tiny", max_model_len=32)
    with pytest.raises(InvalidRequestError, match=r"41 tokens but max_model_len is 32"):
        small.generate(["y" * 40], SamplingParams(max_tokens=2))
    assert not small.engine.has_unfinished_requests()
    # Generation stops at the context limit.
    out = small.generate(["y" * 20], SamplingParams(max_tokens=100, ignore_eos=True, temperature=0))[0]
    assert out.finish_reason == "length" and len(out.prompt_token_ids) + len(out.token_ids) == 32


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_p": 2.0}, "min_p"),
        ({"logprobs": 99}, "logprobs"),
        ({"stop": [""]}, "stop"),
        ({"min_tokens": 9, "max_tokens": 2}, "min_tokens"),
        ({"seed": 2**70}, "seed"),
    ],
)
def test_invalid_sampling_values_name_the_parameter(kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequestError, match=param) as info:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert info.value.param == param


def test_bad_prompts_and_options(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([[]], SamplingParams())
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate([[1, 99999]], SamplingParams())
    with pytest.raises(ConfigError, match="unknown engine option 'chunk'"):
        LLM("tiny", chunk=3)
    with pytest.raises(ConfigError, match="role="):
        make_engine_config("tiny", role="sideways")
    with pytest.raises(ModelLoadError, match="no-such-model"):
        LLM("no-such-model")
    assert_no_blocks_used(llm)


def test_roles_are_configurable() -> None:
    config = make_engine_config("tiny", role="prefill", chunk_size=64)
    assert config.scheduler.role is Role.PREFILL and config.scheduler.chunk_size == 64


def test_preset_weights_are_deterministic() -> None:
    import torch

    from pdserve.modelspec.arch import load_arch_config

    arch = load_arch_config("tiny")
    a = load_model("tiny", arch, torch.float32, torch.device("cpu"), seed=3)
    b = load_model("tiny", arch, torch.float32, torch.device("cpu"), seed=3)
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)


def test_context_limit_is_what_the_kv_cache_holds() -> None:
    """A prompt longer than the whole cache is refused at once; it used to wait for blocks forever."""
    small = LLM("tiny", block_size=16, kv_cache_bytes=1 << 20)
    capacity = small.engine.runner.num_blocks * 16
    assert small.engine.max_model_len == capacity < 4096  # the model allows 4096
    with pytest.raises(InvalidRequestError, match=f"max_model_len is {capacity}"):
        small.generate([[5] * (capacity + 40)], SamplingParams(max_tokens=4))
    out = small.generate([[5] * (capacity - 8)], SamplingParams(max_tokens=50, ignore_eos=True))
    assert out[0].finish_reason == "length" and len(out[0].token_ids) == 8  # stops at the cache's end
    with pytest.raises(ConfigError, match="does not fit the KV cache"):
        LLM("tiny", block_size=16, kv_cache_bytes=1 << 20, max_model_len=capacity + 16)
