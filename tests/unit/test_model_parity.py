"""pdserve's Llama-family model against Hugging Face transformers, logit by logit.

Tiny random HF models (Llama, Llama with llama3 RoPE scaling and tied
embeddings, Qwen2 with QKV bias, Qwen3 with QK-norm) are saved to disk with a
freshly trained BPE tokenizer, loaded back through pdserve's loaders, and run
through the paged cache: whole prompts, prompts in chunks over shuffled
blocks, and a batch mixing a prompt chunk with decodes.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from hf_checkpoints import HF_VOCAB, VARIANTS, build_hf_model, train_tokenizer  # noqa: E402

from pdserve.model import (  # noqa: E402
    LlamaForCausalLM,
    SeqSpec,
    allocate_kv_cache,
    attention,
    build_attention_metadata,
    load_model,
    save_hf_checkpoint,
)
from pdserve.modelspec import load_arch_config  # noqa: E402
from pdserve.tokenizer import load_tokenizer  # noqa: E402

ATOL = 1e-4
PROMPT_LENGTHS = (1, 7, 33)


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(checkpoint dir, HF model, pdserve model) for one variant."""
    out_dir = tmp_path_factory.mktemp(request.param)
    hf_model = build_hf_model(request.param, out_dir)
    train_tokenizer(out_dir)
    arch = load_arch_config(str(out_dir))
    model = load_model(str(out_dir), arch, torch.float32, torch.device("cpu"))
    return out_dir, hf_model, model


def prompt_ids(length: int, seed: int) -> list[int]:
    gen = random.Random(seed)
    return [gen.randrange(HF_VOCAB) for _ in range(length)]


@torch.no_grad()
def hf_logits(hf_model: Any, ids: list[int]) -> torch.Tensor:
    return hf_model(torch.tensor([ids])).logits[0].float()  # [T, V]


class PagedRunner:
    """Drives pdserve's model step by step over a shuffled paged cache."""

    def __init__(self, model: LlamaForCausalLM, block_size: int, num_blocks: int = 64) -> None:
        arch = model.arch
        self.model = model
        self.block_size = block_size
        self.cache = allocate_kv_cache(
            arch.num_layers,
            num_blocks,
            block_size,
            arch.num_kv_heads,
            arch.head_dim,
            torch.float32,
            torch.device("cpu"),
        )
        self.free = list(range(num_blocks))
        random.Random(1).shuffle(self.free)

    def blocks_for(self, num_tokens: int) -> list[int]:
        n = -(-num_tokens // self.block_size)
        taken, self.free = self.free[:n], self.free[n:]
        return taken

    @torch.no_grad()
    def step(self, items: list[tuple[list[int], int, int, list[int]]]) -> torch.Tensor:
        """items: (all token ids, num_computed, num_new, block_ids) → logits [T, V]."""
        specs, input_ids, positions = [], [], []
        for ids, computed, new, blocks in items:
            specs.append(SeqSpec(computed, new, blocks))
            input_ids += ids[computed : computed + new]
            positions += range(computed, computed + new)
        meta = build_attention_metadata(specs, self.block_size, torch.device("cpu"))
        hidden = self.model(torch.tensor(input_ids), torch.tensor(positions), self.cache, meta)
        return self.model.compute_logits(hidden)


@pytest.mark.parametrize("length", PROMPT_LENGTHS)
def test_whole_prompt_matches_hf(checkpoint, length: int) -> None:
    _, hf_model, model = checkpoint
    ids = prompt_ids(length, seed=length)
    runner = PagedRunner(model, block_size=16)
    logits = runner.step([(ids, 0, length, runner.blocks_for(length))])
    expected = hf_logits(hf_model, ids)
    assert expected.std() > 0.5  # logits are not near-uniform, so the comparison means something
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("length", PROMPT_LENGTHS)
def test_chunked_prompt_matches_hf(checkpoint, length: int) -> None:
    _, hf_model, model = checkpoint
    ids = prompt_ids(length, seed=100 + length)
    runner = PagedRunner(model, block_size=4)
    blocks = runner.blocks_for(length)
    assert len(blocks) == 1 or blocks != sorted(blocks)
    chunks = []
    for start in range(0, length, 5):
        new = min(5, length - start)
        chunks.append(runner.step([(ids, start, new, blocks)]))
    torch.testing.assert_close(torch.cat(chunks), hf_logits(hf_model, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("gather_budget", [attention.CPU_GATHER_BUDGET_BYTES, 1])
def test_mixed_batch_of_chunk_and_decodes_matches_hf(
    checkpoint, gather_budget: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # budget 1 byte: decodes are attended one row at a time (the CPU grouping path)
    monkeypatch.setattr(attention, "CPU_GATHER_BUDGET_BYTES", gather_budget)
    _, hf_model, model = checkpoint
    runner = PagedRunner(model, block_size=4)
    seq_a, seq_b, seq_c = prompt_ids(33, 1), prompt_ids(9, 2), prompt_ids(14, 3)
    blocks = {name: runner.blocks_for(len(ids)) for name, ids in (("a", seq_a), ("b", seq_b), ("c", seq_c))}
    # prefill all but the last token of b and c, and the first 12 tokens of a
    runner.step([(seq_b, 0, 8, blocks["b"]), (seq_c, 0, 13, blocks["c"]), (seq_a, 0, 12, blocks["a"])])
    # decodes around a prefill chunk: rows b (1), a-chunk (10), c (1)
    logits = runner.step(
        [(seq_b, 8, 1, blocks["b"]), (seq_a, 12, 10, blocks["a"]), (seq_c, 13, 1, blocks["c"])]
    )
    torch.testing.assert_close(logits[0], hf_logits(hf_model, seq_b)[8], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1:11], hf_logits(hf_model, seq_a)[12:22], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[11], hf_logits(hf_model, seq_c)[13], atol=ATOL, rtol=0)
    # a pure decode step with contiguous rows (the fast path), one of them a 1-token prompt
    seq_d = prompt_ids(1, 4)
    blocks["d"] = runner.blocks_for(1)
    logits = runner.step([([*seq_c, 5], 14, 1, blocks["c"]), (seq_d, 0, 1, blocks["d"])])
    torch.testing.assert_close(logits[0], hf_logits(hf_model, [*seq_c, 5])[14], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1], hf_logits(hf_model, seq_d)[0], atol=ATOL, rtol=0)
    # contiguous decodes followed by the last chunk of a
    seq_d = [*seq_d, 7]
    logits = runner.step(
        [([*seq_b, 6], 9, 1, blocks["b"]), (seq_d, 1, 1, blocks["d"]), (seq_a, 22, 11, blocks["a"])]
    )
    torch.testing.assert_close(logits[0], hf_logits(hf_model, [*seq_b, 6])[9], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1], hf_logits(hf_model, seq_d)[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[2:], hf_logits(hf_model, seq_a)[22:], atol=ATOL, rtol=0)


def test_layer_callback_fires_after_each_kv_write(checkpoint) -> None:
    _, _, model = checkpoint
    runner = PagedRunner(model, block_size=4)
    blocks = runner.blocks_for(6)
    seen: list[tuple[int, bool]] = []

    def on_layer_done(layer: int) -> None:
        k_cache = runner.cache[layer][0]
        seen.append((layer, bool(k_cache[blocks[1], 1].abs().sum() > 0)))  # position 5

    meta = build_attention_metadata([SeqSpec(0, 6, blocks)], 4, torch.device("cpu"))
    with torch.no_grad():
        model(torch.arange(6), torch.arange(6), runner.cache, meta, on_layer_done=on_layer_done)
    assert seen == [(i, True) for i in range(model.arch.num_layers)]


def test_sharded_checkpoint_loads_identically(checkpoint, tmp_path: Path) -> None:
    out_dir, hf_model, model = checkpoint
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((out_dir / name).read_bytes())
    sharded = load_model(str(tmp_path), load_arch_config(str(tmp_path)), torch.float32, torch.device("cpu"))
    reference = model.state_dict()
    for name, tensor in sharded.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_arch_config_reads_hf_fields(checkpoint) -> None:
    out_dir, hf_model, _ = checkpoint
    arch = load_arch_config(str(out_dir))
    config = hf_model.config
    assert arch.tie_word_embeddings == bool(config.tie_word_embeddings)
    assert arch.attention_bias == (arch.architecture == "Qwen2ForCausalLM")
    assert arch.qk_norm == (arch.architecture == "Qwen3ForCausalLM")
    assert arch.eos_token_ids == (2,)
    if "llama3" in str(out_dir):
        assert arch.rope_type == "llama3" and arch.rope_theta == 500000.0


def test_hf_tokenizer_round_trip_and_chat(checkpoint) -> None:
    out_dir, _, _ = checkpoint
    tok = load_tokenizer(str(out_dir))
    text = "Hello, world! Grüße — 你好 🙂 paged attention"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == 1
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.eos_token_ids == (4, 2)  # <|im_end|> from tokenizer_config, then config.json
    assert max(ids) < tok.vocab_size <= HF_VOCAB
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    chat_ids = tok.encode(prompt, add_special_tokens=False)
    assert chat_ids[:2] == [1, 3]  # specials are single tokens
    assert tok.convert_ids_to_tokens([1, 3]) == ["<s>", "<|im_start|>"]
    assert tok.id_to_piece(tok.encode(" paged", add_special_tokens=False)[0]).startswith(" ")


@pytest.mark.parametrize("preset", ["tiny"])
def test_exported_preset_matches_in_transformers(preset: str, tmp_path: Path) -> None:
    """Benchmarks compare against HF generate on the preset's very weights (bench-50m: same code)."""
    save_hf_checkpoint(preset, str(tmp_path), seed=5)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    arch = load_arch_config(preset)
    assert load_arch_config(str(tmp_path)) == arch
    model = load_model(preset, arch, torch.float32, torch.device("cpu"), seed=5)
    ids = [i % arch.vocab_size for i in prompt_ids(12, seed=9)]
    runner = PagedRunner(model, block_size=16)
    logits = runner.step([(ids, 0, len(ids), runner.blocks_for(len(ids)))])
    torch.testing.assert_close(logits, hf_logits(hf_model, ids), atol=ATOL, rtol=0)


def test_hf_encode_chat_has_one_bos(checkpoint) -> None:
    out_dir, _, _ = checkpoint
    tok = load_tokenizer(str(out_dir))
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
