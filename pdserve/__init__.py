"""pdserve: disaggregated prefill/decode LLM serving.

The offline entry point is :class:`LLM`; ``pdserve serve`` runs the
OpenAI-compatible server. Names are imported lazily so that torch-free parts
(the router, the tokenizer) start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pdserve.engine.engine import LLMEngine, RequestOutput
    from pdserve.engine.llm import LLM, make_engine_config
    from pdserve.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "RequestOutput", "SamplingParams", "make_engine_config"]
__version__ = "0.1.0"

_LAZY = {
    "LLM": "pdserve.engine.llm",
    "make_engine_config": "pdserve.engine.llm",
    "LLMEngine": "pdserve.engine.engine",
    "RequestOutput": "pdserve.engine.engine",
    "SamplingParams": "pdserve.sampling_params",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pdserve' has no attribute {name!r}")
