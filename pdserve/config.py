"""Frozen, validated configuration for each subsystem of the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from pdserve.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
#: Weight quantization methods (``--quantization``), see :mod:`pdserve.model.quant`.
QUANTIZATION_METHODS = ("none", "int8")


class Role(StrEnum):
    """What an engine does with a request.

    ``prefill`` stops after the first token and keeps the KV for hand-off,
    ``decode`` only continues requests whose KV was written from outside,
    ``mixed`` does both (the aggregated baseline).
    """

    PREFILL = "prefill"
    DECODE = "decode"
    MIXED = "mixed"


@dataclass(frozen=True)
class ModelConfig:
    """Which model to run, and how.

    Attributes:
        model: a built-in preset name (``tiny``, ``bench-50m``), an alias of a
            packaged model (``smollm2-135m``), a GGUF file or a local Hugging
            Face checkpoint directory.
        dtype: ``float32``, ``bfloat16`` or ``float16`` (fp32 is fastest on CPUs).
        device: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        max_model_len: longest prompt + output in tokens; defaults to the model's limit.
        seed: seed of the deterministic dummy weights of presets.
        quantization: ``none`` or ``int8`` (int8 weights with per-channel
            scales for the linear layers and the LM head; see docs/models.md).
    """

    model: str = "tiny"
    dtype: str = "float32"
    device: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    quantization: str = "none"

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATION_METHODS:
            raise ConfigError(
                f"quantization={self.quantization!r} is not one of {', '.join(QUANTIZATION_METHODS)}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device={self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len={self.max_model_len} must be ≥ 2")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache.

    Attributes:
        block_size: tokens per KV block.
        num_blocks: blocks to allocate; None sizes the cache from ``kv_cache_bytes``.
        kv_cache_bytes: memory for K and V of all layers when num_blocks is None.
        enable_prefix_caching: reuse full blocks whose token prefix was seen before.
    """

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_bytes: int = 1 << 30
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size={self.block_size} must be a power of two ≥ 1")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError(f"num_blocks={self.num_blocks} must be ≥ 1")
        if self.kv_cache_bytes < 1:
            raise ConfigError(f"kv_cache_bytes={self.kv_cache_bytes} must be ≥ 1")


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step batching limits.

    Attributes:
        role: prefill, decode or mixed (see :class:`Role`).
        max_num_batched_tokens: token budget of one step (prompt chunks + decodes).
        max_num_seqs: most requests running at once.
        enable_chunked_prefill: split long prompts across steps so decodes keep
            flowing; when off, a prompt is prefilled whole in one step.
        chunk_size: most prompt tokens one request computes in one step.
    """

    role: Role = Role.MIXED
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    enable_chunked_prefill: bool = True
    chunk_size: int = 512

    def __post_init__(self) -> None:
        if not isinstance(self.role, Role):
            try:
                object.__setattr__(self, "role", Role(self.role))
            except ValueError:
                roles = ", ".join(r.value for r in Role)
                raise ConfigError(f"role={self.role!r} is not one of {roles}") from None
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be ≥ 1")
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs={self.max_num_seqs} must be ≥ 1")
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size={self.chunk_size} must be ≥ 1")


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine needs: model, cache and scheduler settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
