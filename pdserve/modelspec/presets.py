"""Built-in model presets: Llama-architecture shapes with dummy weights.

Presets need no files on disk: the shape lives here and the weights are drawn
from a seeded generator by :mod:`pdserve.model.loader`. Both presets use the
byte-level tokenizer (:class:`pdserve.tokenizer.ByteTokenizer`); ids of
``bench-50m`` beyond the byte range decode to placeholder pieces.

This module must not import torch: the router reads presets too.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from pdserve.tokenizer import BYTE_VOCAB_SIZE, ByteTokenizer

#: Keyword arguments of :class:`pdserve.modelspec.arch.ArchConfig`, per preset name.
PRESETS: MappingProxyType[str, dict[str, Any]] = MappingProxyType(
    {
        "tiny": {
            "architecture": "LlamaForCausalLM",
            "vocab_size": BYTE_VOCAB_SIZE,
            "hidden_size": 128,
            "num_layers": 4,
            "num_heads": 4,
            "num_kv_heads": 2,
            "head_dim": 32,
            "intermediate_size": 352,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "rope_scaling": None,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": True,
            "bos_token_id": ByteTokenizer.BOS_ID,
            "eos_token_ids": (ByteTokenizer.EOS_ID,),
        },
        "bench-50m": {
            "architecture": "LlamaForCausalLM",
            "vocab_size": 32000,
            "hidden_size": 512,
            "num_layers": 8,
            "num_heads": 8,
            "num_kv_heads": 4,
            "head_dim": 64,
            "intermediate_size": 1408,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "rope_scaling": None,
            "max_position_embeddings": 8192,
            "tie_word_embeddings": False,
            "bos_token_id": ByteTokenizer.BOS_ID,
            "eos_token_ids": (ByteTokenizer.EOS_ID,),
        },
    }
)


def preset_names() -> list[str]:
    """Names of the built-in presets, sorted."""
    return sorted(PRESETS)


def is_preset(model: str) -> bool:
    """Whether ``model`` names a built-in preset (presets win over same-named folders)."""
    return model in PRESETS
