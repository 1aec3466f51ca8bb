"""What a model name refers to, without torch: its shape and where it comes from.

- :mod:`pdserve.modelspec.presets`: the built-in presets (dummy weights);
- :mod:`pdserve.modelspec.arch`: :class:`ArchConfig`, read from a preset or a
  Hugging Face ``config.json``.

The router reads these for the model's limits; the model package builds the
network from the same :class:`ArchConfig`.
"""

from __future__ import annotations

from pdserve.modelspec.arch import (
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_ROPE_TYPES,
    ArchConfig,
    load_arch_config,
)
from pdserve.modelspec.presets import PRESETS, is_preset, preset_names

__all__ = [
    "PRESETS",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_ROPE_TYPES",
    "ArchConfig",
    "is_preset",
    "load_arch_config",
    "preset_names",
]
