"""Accelerators and model shapes on paper, read from ``hardware.json`` (each figure with its source).

:func:`accelerator` and :func:`paper_model` look names up; an unknown name
raises :class:`ConfigError` listing the known ones. Models are the table's
(Llama-3-8B/70B, Qwen2.5-7B/72B) plus pdserve's presets and any local HF
checkpoint directory (their shape is read the way the engine reads it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pdserve.errors import ConfigError
from pdserve.modelspec.arch import ArchConfig, load_arch_config
from pdserve.modelspec.presets import preset_names

_TABLE = Path(__file__).with_name("hardware.json")


@dataclass(frozen=True)
class Accelerator:
    """One accelerator's datasheet figures (dense peaks) and price.

    Attributes:
        key: short name used on the command line (``h100``).
        name: full product name.
        bf16_flops, fp8_flops: dense peak FLOP/s (fp8 None when the part has none).
        mem_bytes_per_s, mem_bytes: HBM/GDDR bandwidth and capacity.
        intra_node_bytes_per_s: one-direction bandwidth to peers for TP (None: TP not modelled).
        network_bytes_per_s: scale-out network per accelerator (the KV link between nodes).
        max_tp: largest TP degree modelled (accelerators per node).
        price_per_hour: USD per accelerator-hour (an input).
        sources: where each figure comes from.
    """

    key: str
    name: str
    bf16_flops: float
    fp8_flops: float | None
    mem_bytes_per_s: float
    mem_bytes: float
    intra_node_bytes_per_s: float | None
    network_bytes_per_s: float
    max_tp: int
    price_per_hour: float
    sources: tuple[str, ...]

    def peak_flops(self, precision: str) -> float:
        """Dense peak at ``bf16`` or ``fp8``; a part without fp8 is refused."""
        if precision == "bf16":
            return self.bf16_flops
        if precision == "fp8":
            if self.fp8_flops is None:
                raise ConfigError(f"{self.name} has no fp8 tensor cores: use --precision bf16")
            return self.fp8_flops
        raise ConfigError(f"precision {precision!r}: use bf16 or fp8")

    def check_tp(self, tp: int) -> None:
        """Refuse TP degrees the table cannot model for this part."""
        if tp < 1 or tp > self.max_tp or (tp > 1 and self.intra_node_bytes_per_s is None):
            limit = self.max_tp if self.intra_node_bytes_per_s is not None else 1
            raise ConfigError(f"--tp {tp} on {self.key}: modelled for 1..{limit}")


@cache
def _table() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(_TABLE.read_text())
    return data


def accelerator_names() -> list[str]:
    """Keys of the accelerators in the table."""
    return sorted(_table()["accelerators"])


def paper_model_names() -> list[str]:
    """Model names the table knows, and the presets."""
    return sorted(_table()["models"]) + preset_names()


def accelerator(key: str, price_per_hour: float | None = None) -> Accelerator:
    """An accelerator by key (``h100``, ``h200``, ``a100``, ``l40s``, ``mi300x``, ``trn1``)."""
    entry = _table()["accelerators"].get(key.lower())
    if entry is None:
        raise ConfigError(f"unknown hardware {key!r}; known: {', '.join(accelerator_names())}")
    fp8 = entry["fp8_tflops"]
    intra = entry["intra_node_gbytes_per_s"]
    return Accelerator(
        key=key.lower(), name=entry["name"], bf16_flops=entry["bf16_tflops"] * 1e12,
        fp8_flops=None if fp8 is None else fp8 * 1e12, mem_bytes_per_s=entry["mem_gbytes_per_s"] * 1e9,
        mem_bytes=entry["mem_gib"] * 2**30, intra_node_bytes_per_s=None if intra is None else intra * 1e9,
        network_bytes_per_s=entry["network_gbps_per_accel"] * 1e9 / 8, max_tp=entry["max_tp"],
        price_per_hour=entry["price_per_hour"] if price_per_hour is None else price_per_hour,
        sources=tuple(entry["sources"]),
    )


def paper_model(name: str) -> ArchConfig:
    """A model's shape: the table's, a preset's or a local checkpoint's; unknown names list the known."""
    entry = _table()["models"].get(name.lower())
    if entry is not None:
        return ArchConfig(**entry["arch"])
    if name in preset_names() or Path(name).is_dir():
        return load_arch_config(name)
    raise ConfigError(f"unknown model {name!r}; known: {', '.join(paper_model_names())} "
                      f"(or a local Hugging Face checkpoint directory)")


def paper_model_source(name: str) -> str:
    """Where a table model's shape comes from."""
    entry = _table()["models"].get(name.lower())
    return entry["source"] if entry else f"pdserve preset or checkpoint {name}"
