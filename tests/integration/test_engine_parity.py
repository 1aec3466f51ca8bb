"""Greedy generation through the whole engine equals Hugging Face transformers.

Random Llama, Qwen2 and Qwen3 checkpoints (saved with a trained tokenizer)
are generated 32 tokens greedily by transformers (a plain loop with its KV
cache) and by pdserve: alone, in a batch of different lengths, under chunked
prefill with several chunk sizes, and with preemption and recompute forced by
a tiny KV cache. Every path must give identical tokens.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from hf_checkpoints import HF_VOCAB, build_hf_model, train_tokenizer

from pdserve import LLM, SamplingParams

NUM_TOKENS = 32
PROMPT_LENGTHS = (1, 5, 17, 40)
GREEDY = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)


@torch.no_grad()
def hf_greedy(model: Any, prompt: list[int], num_tokens: int = NUM_TOKENS) -> list[int]:
    out = model(torch.tensor([prompt]), use_cache=True)
    past, tokens = out.past_key_values, []
    for _ in range(num_tokens):
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
    return tokens


def prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(3, HF_VOCAB) for _ in range(n)] for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module", params=["llama", "llama3-tied", "qwen2", "qwen3"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:  # type: ignore[type-arg]
    out_dir = tmp_path_factory.mktemp(request.param)
    model = build_hf_model(request.param, out_dir)
    train_tokenizer(out_dir)
    return out_dir, [hf_greedy(model, p) for p in prompts()]


def test_alone_and_batched(checkpoint: tuple[Path, list[list[int]]]) -> None:
    path, want = checkpoint
    llm = LLM(str(path), block_size=4)
    for prompt, expected in zip(prompts(), want, strict=True):
        assert llm.generate([prompt], GREEDY)[0].token_ids == expected
    assert [o.token_ids for o in llm.generate(prompts(), GREEDY)] == want


@pytest.mark.parametrize("chunk_size", [3, 8, 16])
def test_chunked_prefill(checkpoint: tuple[Path, list[list[int]]], chunk_size: int) -> None:
    path, want = checkpoint
    llm = LLM(str(path), block_size=4, chunk_size=chunk_size, max_num_batched_tokens=chunk_size + 4)
    outs = llm.generate(prompts(), GREEDY)
    assert [o.token_ids for o in outs] == want


def test_preemption_and_recompute(checkpoint: tuple[Path, list[list[int]]]) -> None:
    path, want = checkpoint
    # 40 blocks of 4 tokens cannot hold all four requests at full length (sum ≈ 63 + 4·32 tokens).
    llm = LLM(str(path), block_size=4, num_blocks=40, enable_prefix_caching=False)
    outs = llm.generate(prompts(), GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == want
    assert llm.engine.block_manager.stats().num_used_blocks == 0
