"""Tokenizers, the incremental detokenizer and chat templates (torch-free).

The router, the bench and the engine all take their text handling from here:

- :mod:`pdserve.tokenizer.tokenizers`: the :class:`Tokenizer` interface, the
  presets' :class:`ByteTokenizer`, Hugging Face's ``tokenizer.json``
  (:class:`HFTokenizer`) and :func:`load_tokenizer` for a model name;
- :mod:`pdserve.tokenizer.chat_template`: Jinja chat templates in a sandbox;
- :mod:`pdserve.tokenizer.detokenizer`: incremental decoding with stop strings.

Nothing in this package imports torch, :mod:`pdserve.model` or :mod:`pdserve.engine`.
"""

from __future__ import annotations

from pdserve.tokenizer.detokenizer import Detokenizer
from pdserve.tokenizer.tokenizers import (
    BYTE_VOCAB_SIZE,
    ByteTokenizer,
    HFTokenizer,
    Message,
    Tokenizer,
    load_tokenizer,
)

__all__ = [
    "BYTE_VOCAB_SIZE",
    "ByteTokenizer",
    "Detokenizer",
    "HFTokenizer",
    "Message",
    "Tokenizer",
    "load_tokenizer",
]
