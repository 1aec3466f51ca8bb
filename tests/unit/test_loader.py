"""Loading models: presets, HF folders, and clear errors for every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pdserve.errors import ConfigError, ModelLoadError, UnsupportedModelError
from pdserve.model import (
    LlamaForCausalLM,
    SeqSpec,
    allocate_kv_cache,
    build_attention_metadata,
    dummy_weights,
    load_model,
    resolve_device,
    resolve_dtype,
)
from pdserve.modelspec import ArchConfig, load_arch_config

CPU = torch.device("cpu")
SMALL = ArchConfig(
    architecture="LlamaForCausalLM",
    vocab_size=64,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    intermediate_size=48,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_ids=(2,),
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and lose a lot when another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_checkpoint(path: Path, arch: ArchConfig = SMALL) -> dict[str, torch.Tensor]:
    """A valid one-file checkpoint of ``arch`` in ``path``; returns its tensors."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(arch.to_hf_config()))
    tensors = dict(dummy_weights(LlamaForCausalLM(arch), seed=3))
    save_file(tensors, str(path / "model.safetensors"))
    return tensors


def load(path: Path) -> LlamaForCausalLM:
    return load_model(str(path), load_arch_config(str(path)), torch.float32, CPU)


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(ModelLoadError, match=r"'tiny-typo'.*bench-50m, tiny"):
        load_arch_config("tiny-typo")


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"nope.*neither a built-in preset"):
        load_arch_config(str(tmp_path / "nope"))


def test_missing_config_json(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"config.json not found"):
        load_arch_config(str(tmp_path))


def test_corrupt_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    with pytest.raises(ModelLoadError, match=r"config.json is not valid JSON"):
        load_arch_config(str(tmp_path))


def test_config_missing_a_field_names_it(tmp_path: Path) -> None:
    config = SMALL.to_hf_config()
    del config["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="hidden_size"):
        load_arch_config(str(tmp_path))


def test_unsupported_architecture_names_it_and_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModelError, match=r"GPT2LMHeadModel.*LlamaForCausalLM.*Qwen3"):
        load_arch_config(str(tmp_path))


def test_unsupported_rope_scaling(tmp_path: Path) -> None:
    config = {
        **SMALL.to_hf_config(),
        "rope_parameters": None,
        "rope_scaling": {"type": "yarn", "factor": 4.0},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="yarn"):
        load_arch_config(str(tmp_path))


def test_old_style_rope_and_generation_config(tmp_path: Path) -> None:
    config = {
        **SMALL.to_hf_config(),
        "rope_parameters": None,
        "rope_theta": 5e5,
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "eos_token_id": 2,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    arch = load_arch_config(str(tmp_path))
    assert arch.rope_theta == 5e5
    assert arch.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert arch.eos_token_ids == (7, 2)


def test_mistral_sliding_window_caps_max_positions(tmp_path: Path) -> None:
    config = {
        **SMALL.to_hf_config(),
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "sliding_window": 32,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_arch_config(str(tmp_path)).max_position_embeddings == 32


def test_valid_checkpoint_loads(tmp_path: Path) -> None:
    tensors = write_checkpoint(tmp_path)
    model = load(tmp_path)
    assert torch.equal(
        model.model.layers[0].self_attn.o_proj.weight, tensors["model.layers.0.self_attn.o_proj.weight"]
    )


def test_missing_weights_file(tmp_path: Path) -> None:
    write_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"no model.safetensors.*only safetensors"):
        load(tmp_path)


def test_truncated_safetensors(tmp_path: Path) -> None:
    write_checkpoint(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load(tmp_path)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    tensors = write_checkpoint(tmp_path)
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"missing.*model.layers.0.mlp.up_proj.weight"):
        load(tmp_path)


def test_unknown_tensor_is_named(tmp_path: Path) -> None:
    tensors = write_checkpoint(tmp_path)
    tensors["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"unknown.*model.layers.0.extra.weight"):
        load(tmp_path)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path: Path) -> None:
    tensors = write_checkpoint(tmp_path)
    tensors["model.norm.weight"] = torch.ones(31)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"model.norm.weight.*\(31,\).*\(32,\)"):
        load(tmp_path)


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    tensors = write_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    index = {"weight_map": {name: "model-00001-of-00002.safetensors" for name in tensors}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"model-00001-of-00002.safetensors"):
        load(tmp_path)


def test_presets_are_deterministic_per_seed() -> None:
    arch = load_arch_config("tiny")
    first = load_model("tiny", arch, torch.float32, CPU, seed=0).state_dict()
    again = load_model("tiny", arch, torch.float32, CPU, seed=0).state_dict()
    other = load_model("tiny", arch, torch.float32, CPU, seed=1).state_dict()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_tiny_preset_gives_peaked_logits() -> None:
    arch = load_arch_config("tiny")
    model = load_model("tiny", arch, torch.float32, CPU)
    cache = allocate_kv_cache(arch.num_layers, 4, 16, arch.num_kv_heads, arch.head_dim, torch.float32, CPU)
    meta = build_attention_metadata([SeqSpec(0, 20, [2, 0])], 16, CPU)
    with torch.no_grad():
        logits = model.compute_logits(model(torch.arange(3, 23), torch.arange(20), cache, meta))
    assert logits.dtype == torch.float32 and logits.shape == (20, arch.vocab_size)
    assert torch.isfinite(logits).all()
    assert 0.5 < logits.std().item() < 10
    assert len(set(logits.argmax(-1).tolist())) > 1


def test_presets_shapes_match_the_benchmark_table() -> None:
    bench = load_arch_config("bench-50m")
    assert (
        bench.hidden_size,
        bench.num_layers,
        bench.num_heads,
        bench.num_kv_heads,
        bench.intermediate_size,
        bench.vocab_size,
    ) == (512, 8, 8, 4, 1408, 32000)
    assert not bench.tie_word_embeddings and load_arch_config("tiny").tie_word_embeddings


def test_resolve_dtype_and_device() -> None:
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ConfigError, match="float64"):
        resolve_dtype("float64")
    with pytest.raises(ConfigError, match="tpu"):
        resolve_device("tpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_runs_and_returns_fp32_logits(dtype: torch.dtype) -> None:
    arch = load_arch_config("tiny")
    model = load_model("tiny", arch, dtype, CPU)
    reference = load_model("tiny", arch, torch.float32, CPU)
    outs = []
    for net, cache_dtype in ((model, dtype), (reference, torch.float32)):
        cache = allocate_kv_cache(arch.num_layers, 4, 16, arch.num_kv_heads, arch.head_dim, cache_dtype, CPU)
        meta = build_attention_metadata([SeqSpec(0, 8, [1])], 16, CPU)
        with torch.no_grad():
            outs.append(net.compute_logits(net(torch.arange(3, 11), torch.arange(8), cache, meta)))
    assert outs[0].dtype == torch.float32
    torch.testing.assert_close(outs[0], outs[1], atol=0.15, rtol=0.05)


@pytest.mark.parametrize("preset", ["tiny", "bench-50m"])
def test_hf_config_round_trip(preset: str, tmp_path: Path) -> None:
    arch = load_arch_config(preset)
    (tmp_path / "config.json").write_text(json.dumps(arch.to_hf_config()))
    assert load_arch_config(str(tmp_path)) == arch


def test_llama3_rope_round_trip_and_validation(tmp_path: Path) -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    arch = ArchConfig(**{**SMALL.as_dict(), "rope_scaling": scaling})
    (tmp_path / "config.json").write_text(json.dumps(arch.to_hf_config()))
    assert load_arch_config(str(tmp_path)) == arch
    with pytest.raises(ConfigError, match="original_max_position_embeddings"):
        ArchConfig(
            **{
                **SMALL.as_dict(),
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                },
            }
        )
