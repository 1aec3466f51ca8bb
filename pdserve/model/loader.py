"""Build a model on a device and fill its weights.

1. :func:`resolve_device` / :func:`resolve_dtype` turn config strings into torch objects.
2. :func:`load_model` builds :class:`LlamaForCausalLM` on the meta device
   (no memory, no random init), casts it to the target dtype, materialises
   it uninitialised on the target device and recomputes the RoPE tables.
3. Weights come from :func:`dummy_weights` for presets — a seeded CPU
   generator, so the same seed gives bit-identical weights on any run and
   device — from the checkpoint's safetensors files
   (:func:`checkpoint_weights`), read lazily tensor by tensor, or from a GGUF
   file (:func:`pdserve.model.gguf.gguf_weights`), dequantized tensor by tensor.
4. :meth:`LlamaForCausalLM.load_weights` checks names and shapes; any
   missing tensor is an error, so no parameter stays uninitialised.
5. On a CPU, :func:`use_cpu_weight_layout` stores the weights of linear layers
   wider out than in transposed in memory (same values, same shapes).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator

import torch
from torch import nn

from pdserve.errors import ConfigError, ModelLoadError
from pdserve.model.gguf import gguf_weights
from pdserve.model.llama import LlamaForCausalLM
from pdserve.modelspec.aliases import resolve_alias
from pdserve.modelspec.arch import ArchConfig, load_arch_config
from pdserve.modelspec.gguf_file import is_gguf_file
from pdserve.modelspec.presets import is_preset

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def resolve_device(name: str) -> torch.device:
    """``auto`` → ``cuda`` when available else ``cpu``; also ``cpu``, ``cuda``, ``cuda:N``.

    Raises:
        ConfigError: an unknown name, or CUDA asked for but not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} but CUDA is not available; use cpu or auto")
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise ConfigError(f"device={name!r} is not a valid CUDA device: {e}") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name!r} but only {torch.cuda.device_count()} CUDA devices exist")
        return device
    raise ConfigError(f"device={name!r}: use auto, cpu, cuda or cuda:N")


def resolve_dtype(name: str) -> torch.dtype:
    """``float32``/``bfloat16``/``float16`` (or fp32/bf16/fp16/half) → torch dtype.

    Raises:
        ConfigError: an unknown name.
    """
    try:
        return _DTYPES[name]
    except KeyError:
        raise ConfigError(f"dtype={name!r} is not one of float32, bfloat16, float16") from None


def load_model(
    model: str, arch: ArchConfig, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> LlamaForCausalLM:
    """The model named ``model`` (preset, alias, GGUF file or HF folder) with its weights, in eval mode.

    Raises:
        ModelLoadError: missing, corrupt or incomplete weights.
    """
    with torch.device("meta"):
        net = LlamaForCausalLM(arch)
    net = net.to(dtype=dtype).to_empty(device=device)
    net.reset_buffers()
    if is_preset(model):
        net.load_weights(dummy_weights(net, seed))
    elif is_gguf_file(path := resolve_alias(model)):
        net.load_weights(gguf_weights(path, arch))
    else:
        net.load_weights(checkpoint_weights(path))
    if device.type == "cpu":
        use_cpu_weight_layout(net)
    logger.info("loaded %s (%d params) as %s on %s", model, arch.num_params(), dtype, device)
    return net.eval()


def use_cpu_weight_layout(net: nn.Module) -> None:
    """Store each linear weight ``[out, in]`` with ``out > in`` column-major (a transposed view).

    ``F.linear`` then multiplies by a row-major ``[in, out]`` matrix. With MKL on
    this project's CPUs that is ~2× faster for a single row (decode at batch 1:
    the QKV and gate/up projections and the LM head) and no slower for larger
    batches; a weight with ``out ≤ in`` (o, down projections) is as fast or
    faster as it is, so it stays. Values and shapes do not change. An LM head
    tied to the embedding stays row-major: the embedding lookup reads rows.
    """
    tied = {id(m.weight) for m in net.modules() if isinstance(m, nn.Embedding)}
    for module in net.modules():
        if isinstance(module, nn.Linear) and module.out_features > module.in_features:
            weight = module.weight
            if id(weight) not in tied and weight.is_contiguous():
                module.weight = nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=False)


def dummy_weights(net: LlamaForCausalLM, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Deterministic random weights for every HF tensor of ``net``, in a fixed order.

    Norm scales are 1 and biases 0. Projections are normal with std
    ``1 / sqrt(fan_in)`` so every layer changes the residual stream. The
    embedding has std 1 (RMSNorm rescales it anyway); an untied LM head
    has std ``2 / sqrt(hidden)``, giving logits with std about 2 — peaked
    enough that sampling and greedy decoding are not degenerate. Tied
    embeddings use the LM head's std.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    hidden = net.arch.hidden_size
    head_std = 2.0 / math.sqrt(hidden)
    for name, shape in net.hf_weight_shapes().items():
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape)
        elif name.endswith(".bias"):
            yield name, torch.zeros(shape)
        else:
            if name == "lm_head.weight" or (
                name == "model.embed_tokens.weight" and net.arch.tie_word_embeddings
            ):
                std = head_std
            elif name == "model.embed_tokens.weight":
                std = 1.0
            else:
                std = 1.0 / math.sqrt(shape[1])
            yield name, torch.randn(shape, generator=generator) * std


def save_hf_checkpoint(model: str, out_dir: str, seed: int = 0) -> None:
    """Write preset ``model`` with seed ``seed`` as an HF folder (config.json + model.safetensors).

    Lets benchmarks load the very same weights into transformers. No tokenizer is written.

    Raises:
        ModelLoadError: ``model`` is not a preset.
    """
    from safetensors.torch import save_file

    if not is_preset(model):
        raise ModelLoadError(f"{model!r} is not a preset; only presets can be exported")
    arch = load_arch_config(model)
    with torch.device("meta"):
        net = LlamaForCausalLM(arch)
    os.makedirs(out_dir, exist_ok=True)
    tensors = {name: t.contiguous() for name, t in dummy_weights(net, seed)}
    save_file(tensors, os.path.join(out_dir, SINGLE_FILE), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump({**arch.to_hf_config(), "torch_dtype": "float32"}, f, indent=2)


def _weight_files(model_dir: str) -> list[str]:
    """The safetensors files of a checkpoint folder, shards in index order."""
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            shards = list(dict.fromkeys(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{index_path} is not a valid safetensors index: {e}") from e
        files = [os.path.join(model_dir, shard) for shard in shards]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ModelLoadError(f"{index_path} names shards that do not exist: {', '.join(missing)}")
        return files
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    others = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if others:
        return [os.path.join(model_dir, f) for f in others]
    found = [f for f in os.listdir(model_dir) if f.endswith((".bin", ".pt", ".pth"))]
    hint = f" (found {', '.join(sorted(found))}: only safetensors is supported)" if found else ""
    raise ModelLoadError(f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}{hint}")


def checkpoint_weights(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, CPU tensor) pairs of a checkpoint folder, read one tensor at a time.

    Raises:
        ModelLoadError: no weights file, a missing shard, or a corrupt file.
    """
    from safetensors import safe_open

    for path in _weight_files(model_dir):
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                names = list(f.keys())
                for name in names:
                    tensor = f.get_tensor(name)
                    yield name, tensor
        except ModelLoadError:
            raise
        except Exception as e:  # safetensors raises its own Rust error types
            raise ModelLoadError(f"cannot read {path}: corrupt or truncated safetensors ({e})") from e
