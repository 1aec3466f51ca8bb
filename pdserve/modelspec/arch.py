"""The shape of a decoder-only model, read from a preset or an HF ``config.json``.

1. :func:`load_arch_config` resolves a model name: a built-in preset
   (:mod:`pdserve.modelspec.presets`), an alias of a packaged model
   (:mod:`pdserve.modelspec.aliases`), a GGUF file
   (:mod:`pdserve.modelspec.gguf_file`) or a local Hugging Face checkpoint folder.
2. For a folder it reads ``config.json`` (and ``generation_config.json`` for
   end-of-sequence ids), checks the architecture is one pdserve implements and
   normalises the two HF spellings of RoPE settings (``rope_theta`` +
   ``rope_scaling`` before transformers 5, ``rope_parameters`` after).
3. The result is a frozen, validated :class:`ArchConfig` that the model,
   the KV-cache sizing and the router share.

This module must not import torch: the router imports it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from pdserve.errors import ConfigError, ModelLoadError, UnsupportedModelError
from pdserve.jsonfile import read_json_object
from pdserve.modelspec.presets import PRESETS, preset_names

logger = logging.getLogger(__name__)

#: HF ``architectures`` names pdserve implements (all Llama-family decoders).
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
#: RoPE scaling types pdserve implements; ``default`` means no scaling.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ROPE_REQUIRED_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
_MODEL_TYPE_TO_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclass(frozen=True)
class ArchConfig:
    """Shape and numerics of a Llama-family decoder.

    Attributes:
        architecture: HF class name, one of :data:`SUPPORTED_ARCHITECTURES`.
        vocab_size: rows of the embedding and of the LM head.
        hidden_size: width of the residual stream.
        num_layers: decoder layers.
        num_heads: query heads per layer.
        num_kv_heads: key/value heads per layer (GQA when < num_heads).
        head_dim: width of one head (not always hidden_size / num_heads).
        intermediate_size: width of the SwiGLU MLP.
        rms_norm_eps: epsilon of every RMSNorm.
        rope_theta: RoPE base.
        rope_scaling: None (no scaling) or a dict with ``rope_type`` in
            :data:`SUPPORTED_ROPE_TYPES` and that type's parameters
            (``factor``; for llama3 also ``low_freq_factor``,
            ``high_freq_factor``, ``original_max_position_embeddings``).
        max_position_embeddings: longest sequence in tokens the model supports.
        tie_word_embeddings: the LM head shares the embedding matrix.
        attention_bias: the q/k/v projections have a bias (Qwen2: always).
        attention_out_bias: the output projection has a bias (Llama's
            ``attention_bias`` covers it; Qwen2's does not).
        mlp_bias: the MLP projections have biases (Llama ``mlp_bias``).
        qk_norm: per-head RMSNorm of q and k before RoPE (Qwen3).
        bos_token_id: beginning-of-sequence id, if the model has one.
        eos_token_ids: ids that end generation.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {self.architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError(
                f"rms_norm_eps={self.rms_norm_eps} and rope_theta={self.rope_theta} must be > 0"
            )
        object.__setattr__(self, "rope_scaling", _normalise_rope_scaling(self.rope_scaling))
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))

    @property
    def rope_type(self) -> str:
        """``default``, ``linear`` or ``llama3``."""
        return "default" if self.rope_scaling is None else str(self.rope_scaling["rope_type"])

    @property
    def num_queries_per_kv(self) -> int:
        """Query heads sharing one KV head (the GQA group size)."""
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V of all layers for one token at ``dtype_bytes`` per element."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def num_params(self) -> int:
        """Parameter count (the tied LM head counted once)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        attn = h * (q + 2 * kv) + q * h
        attn += (q + 2 * kv) * self.attention_bias + h * self.attention_out_bias
        attn += 2 * self.head_dim * self.qk_norm
        mlp = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h) * self.mlp_bias
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h

    def to_hf_config(self) -> dict[str, Any]:
        """An HF ``config.json`` dict describing the same model.

        Lets benchmarks build the equivalent transformers model for presets.
        """
        model_type = {v: k for k, v in _MODEL_TYPE_TO_ARCH.items()}[self.architecture]
        rope: dict[str, Any] = {"rope_type": "default"}
        if self.rope_scaling is not None:
            rope = dict(self.rope_scaling)
        cfg: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else rope,
            "rope_parameters": {**rope, "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) or None,
        }
        return cfg

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-serialisable), e.g. for the router's model card."""
        return asdict(self)


def _normalise_rope_scaling(scaling: Any) -> dict[str, Any] | None:
    """Validate RoPE scaling and spell its type as ``rope_type``; no scaling becomes None."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling={scaling!r} must be a dict or None")
    out = dict(scaling)
    rope_type = out.pop("type", None)
    rope_type = out.get("rope_type", rope_type) or "default"
    out.pop("rope_theta", None)
    out["rope_type"] = rope_type
    if rope_type == "default":
        return None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    missing = [k for k in _ROPE_REQUIRED_KEYS[rope_type] if out.get(k) is None]
    if missing:
        raise ConfigError(f"rope scaling {rope_type!r} lacks {', '.join(missing)}")
    if rope_type == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ConfigError("llama3 rope scaling needs high_freq_factor > low_freq_factor")
    return out


def load_arch_config(model: str) -> ArchConfig:
    """The :class:`ArchConfig` of a preset, an alias, a GGUF file or a local HF checkpoint folder.

    Raises:
        ModelLoadError: unknown preset and no such folder, or a missing or
            invalid ``config.json``.
        UnsupportedModelError: an architecture or RoPE type pdserve lacks.
    """
    from pdserve.modelspec.aliases import ALIASES, resolve_alias
    from pdserve.modelspec.gguf_file import arch_config_from_gguf, is_gguf_file

    if model in PRESETS:
        return ArchConfig(**PRESETS[model])
    model = resolve_alias(model)
    if is_gguf_file(model):
        return arch_config_from_gguf(model)
    if not os.path.isdir(model):
        raise ModelLoadError(
            f"model {model!r} is neither a built-in preset ({', '.join(preset_names())}), "
            f"an alias ({', '.join(ALIASES)}), a GGUF file nor an existing local checkpoint directory"
        )
    config = read_json_object(os.path.join(model, "config.json"), required=True)
    generation = read_json_object(os.path.join(model, "generation_config.json"), required=False)
    try:
        return arch_config_from_hf(config, generation)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{model}: {e}") from None
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{os.path.join(model, 'config.json')}: invalid config: {e}") from e



def _as_id_list(value: Any) -> list[int]:
    """An HF token-id field (int, list of ints or None) as a list."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def arch_config_from_hf(config: dict[str, Any], generation: dict[str, Any]) -> ArchConfig:
    """Translate HF ``config.json`` (+ ``generation_config.json``) dicts."""
    archs = config.get("architectures") or []
    arch = archs[0] if archs else _MODEL_TYPE_TO_ARCH.get(config.get("model_type", ""), "")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {arch or config.get('model_type')!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act={act!r} is not supported; only silu")
    hidden = int(config["hidden_size"])
    num_heads = int(config["num_attention_heads"])
    head_dim = config.get("head_dim") or hidden // num_heads

    rope_params = config.get("rope_parameters")
    if isinstance(rope_params, dict) and "full_attention" in rope_params:
        rope_params = rope_params["full_attention"]
    if isinstance(rope_params, dict):
        rope_theta = float(rope_params.get("rope_theta", config.get("rope_theta", 10000.0)))
        scaling: dict[str, Any] | None = dict(rope_params)
    else:
        rope_theta = float(config.get("rope_theta", 10000.0))
        scaling = config.get("rope_scaling")

    max_pos = int(config.get("max_position_embeddings", 4096))
    window = config.get("sliding_window")
    uses_window = arch == "MistralForCausalLM" or bool(config.get("use_sliding_window"))
    if uses_window and isinstance(window, int) and 0 < window < max_pos:
        # pdserve attends over the full context; below the window both agree.
        logger.warning(
            "sliding_window=%d is not implemented; limiting max_position_embeddings %d -> %d",
            window,
            max_pos,
            window,
        )
        max_pos = window

    is_qwen2 = arch == "Qwen2ForCausalLM"
    attention_bias = bool(config.get("attention_bias", False))
    eos = _as_id_list(generation.get("eos_token_id")) + _as_id_list(config.get("eos_token_id"))
    bos = generation.get("bos_token_id", config.get("bos_token_id"))
    return ArchConfig(
        architecture=arch,
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(config["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        intermediate_size=int(config["intermediate_size"]),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=True if is_qwen2 else attention_bias,
        attention_out_bias=False if is_qwen2 else attention_bias,
        mlp_bias=bool(config.get("mlp_bias", False)),
        qk_norm=arch == "Qwen3ForCausalLM",
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(dict.fromkeys(eos)),
    )
