"""Models and the paged attention they run on (torch).

The torch-free parts live elsewhere: model shapes and presets in
:mod:`pdserve.modelspec`, tokenizers in :mod:`pdserve.tokenizer`. Importing
this package itself does not import torch: the names load on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pdserve.model.attention import KVCache, allocate_kv_cache
    from pdserve.model.attention_metadata import AttentionMetadata, SeqSpec, build_attention_metadata
    from pdserve.model.llama import LlamaForCausalLM
    from pdserve.model.loader import (
        dummy_weights,
        load_model,
        resolve_device,
        resolve_dtype,
        save_hf_checkpoint,
    )

_LAZY = {
    "AttentionMetadata": "pdserve.model.attention_metadata",
    "KVCache": "pdserve.model.attention",
    "SeqSpec": "pdserve.model.attention_metadata",
    "allocate_kv_cache": "pdserve.model.attention",
    "build_attention_metadata": "pdserve.model.attention_metadata",
    "LlamaForCausalLM": "pdserve.model.llama",
    "dummy_weights": "pdserve.model.loader",
    "load_model": "pdserve.model.loader",
    "resolve_device": "pdserve.model.loader",
    "resolve_dtype": "pdserve.model.loader",
    "save_hf_checkpoint": "pdserve.model.loader",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AttentionMetadata",
    "KVCache",
    "LlamaForCausalLM",
    "SeqSpec",
    "allocate_kv_cache",
    "build_attention_metadata",
    "dummy_weights",
    "load_model",
    "resolve_device",
    "resolve_dtype",
    "save_hf_checkpoint",
]
