"""GGUF files (llama.cpp's format): opening them, reading metadata, the model's shape.

1. :func:`is_gguf_file` tells a GGUF path from a checkpoint folder or a preset.
2. :func:`open_gguf` parses the header and the tensor table with the ``gguf``
   package (memory-mapped, nothing is dequantized here), checks that every
   tensor's bytes lie inside the file, and caches the result per path, so
   the router's tokenizer and its limits read the file once.
3. :func:`arch_config_from_gguf` turns the ``{arch}.*`` metadata keys into
   an :class:`ArchConfig` (RoPE base and scaling, RMSNorm epsilon, head
   counts, tied embeddings when the file has no ``output.weight``).

Weights are read by :mod:`pdserve.model.gguf`, the tokenizer by
:mod:`pdserve.tokenizer.gguf`. This module must not import torch.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

from pdserve.errors import ModelLoadError, UnsupportedModelError
from pdserve.modelspec.arch import ArchConfig

if TYPE_CHECKING:
    from gguf import GGUFReader

#: GGUF ``general.architecture`` values pdserve runs, with the HF class they map to.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM"}
_MAGIC = b"GGUF"


def is_gguf_file(model: str) -> bool:
    """Whether ``model`` is a path to a GGUF file (by extension or magic bytes)."""
    if not os.path.isfile(model):
        return False
    if model.lower().endswith(".gguf"):
        return True
    try:
        with open(model, "rb") as f:
            return f.read(4) == _MAGIC
    except OSError:
        return False


def open_gguf(path: str) -> GGUFReader:
    """The parsed GGUF file at ``path`` (cached per path, size and modification time).

    Raises:
        ModelLoadError: not a GGUF file, a corrupt header, or a truncated file.
    """
    try:
        stat = os.stat(path)
    except OSError as e:
        raise ModelLoadError(f"cannot open GGUF file {path}: {e}") from e
    return _open_cached(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _open_cached(path: str, size_bytes: int, mtime_ns: int) -> GGUFReader:
    from gguf import GGUFReader

    with open(path, "rb") as f:
        if f.read(4) != _MAGIC:
            raise ModelLoadError(f"{path} is not a GGUF file (no GGUF magic at its start)")
    try:
        reader = GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError, IndexError, struct/numpy errors alike
        raise ModelLoadError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from e
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size_bytes or tensor.data.nbytes != int(tensor.n_bytes):
            raise ModelLoadError(
                f"{path}: truncated GGUF file: tensor {tensor.name} needs bytes up to {end}, "
                f"the file has {size_bytes}"
            )
    return reader


def gguf_value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """The metadata value of ``key`` (str, number, bool or list), or ``default`` if absent."""
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _required(reader: GGUFReader, key: str, path: str) -> Any:
    value = gguf_value(reader, key)
    if value is None:
        raise ModelLoadError(f"{path}: GGUF metadata lacks {key!r}")
    return value


def gguf_architecture(reader: GGUFReader, path: str) -> str:
    """``general.architecture`` of the file, checked against :data:`GGUF_ARCHITECTURES`.

    Raises:
        UnsupportedModelError: an architecture pdserve does not run.
    """
    arch = gguf_value(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    return str(arch)


def arch_config_from_gguf(path: str) -> ArchConfig:
    """The :class:`ArchConfig` of a GGUF file, from its metadata.

    Raises:
        ModelLoadError: a corrupt file or missing metadata.
        UnsupportedModelError: another architecture, mixture-of-experts,
            partial RoPE, or a RoPE scaling pdserve lacks.
    """
    reader = open_gguf(path)
    arch = gguf_architecture(reader, path)
    p = f"{arch}."
    if gguf_value(reader, p + "expert_count", 0):
        raise UnsupportedModelError(f"{path}: mixture-of-experts GGUF models are not supported")
    hidden = int(_required(reader, p + "embedding_length", path))
    num_heads = int(_required(reader, p + "attention.head_count", path))
    num_kv_heads = int(gguf_value(reader, p + "attention.head_count_kv", num_heads))
    head_dim = int(gguf_value(reader, p + "attention.key_length", hidden // num_heads))
    rope_dim = int(gguf_value(reader, p + "rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise UnsupportedModelError(
            f"{path}: partial RoPE (rope.dimension_count={rope_dim}, head_dim={head_dim}) is not supported"
        )
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise UnsupportedModelError(
            f"{path}: per-frequency RoPE factors (rope_freqs.weight, Llama 3.1 style) are not supported"
        )
    scaling_type = gguf_value(reader, p + "rope.scaling.type", "none")
    scaling: dict[str, Any] | None = None
    if scaling_type == "linear":
        scaling = {"rope_type": "linear", "factor": float(_required(reader, p + "rope.scaling.factor", path))}
    elif scaling_type not in ("none", None):
        raise UnsupportedModelError(f"{path}: RoPE scaling {scaling_type!r} is not supported (only linear)")
    tokens = gguf_value(reader, "tokenizer.ggml.tokens")
    vocab_size = gguf_value(reader, p + "vocab_size")
    if vocab_size is None:
        embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        vocab_size = int(embed.shape[1]) if embed is not None else len(tokens or [])
    bos = gguf_value(reader, "tokenizer.ggml.bos_token_id")
    eos = [gguf_value(reader, f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot", "eom")]
    return ArchConfig(
        architecture=GGUF_ARCHITECTURES[arch],
        vocab_size=int(vocab_size),
        hidden_size=hidden,
        num_layers=int(_required(reader, p + "block_count", path)),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=int(_required(reader, p + "feed_forward_length", path)),
        rms_norm_eps=float(gguf_value(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(gguf_value(reader, p + "rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(gguf_value(reader, p + "context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(dict.fromkeys(int(i) for i in eos if i is not None)),
    )
