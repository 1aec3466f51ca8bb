"""The tokenizer stored in a GGUF file's metadata, run by the ``tokenizers`` library.

1. ``tokenizer.ggml.model`` says which kind: ``gpt2`` (byte-level BPE with
   ``tokenizer.ggml.merges``) or ``llama`` (SentencePiece BPE: pieces with
   scores, ``▁`` for spaces, bytes as ``<0xNN>`` pieces).
2. For byte-level BPE, ``tokenizer.ggml.pre`` names the pre-tokenizer
   (the regular expression that splits text before BPE); the common ones are
   rebuilt here, any other falls back to GPT-2's with a warning.
3. For SentencePiece the merges are not stored: every piece that is the
   concatenation of two other pieces is a merge, ranked by the piece's score
   (higher merges first), which is how SentencePiece's BPE applies them.
4. Control and user-defined pieces (``tokenizer.ggml.token_type`` 3 and 4)
   become added tokens, so a chat template's ``<|im_start|>`` is one id.
5. BOS/EOS ids, whether to add BOS/EOS, and the Jinja chat template
   (``tokenizer.chat_template``) come from the same metadata.

Raises :class:`ModelLoadError` when the file has no tokenizer or one of
another kind. This module must not import torch.
"""

from __future__ import annotations

import logging
from typing import Any

from pdserve.errors import ModelLoadError
from pdserve.modelspec.gguf_file import gguf_value, open_gguf
from pdserve.tokenizer.tokenizers import HFTokenizer

logger = logging.getLogger(__name__)

_CONTROL, _USER_DEFINED, _BYTE = 3, 4, 6
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = _LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
#: ``tokenizer.ggml.pre`` → (regular expressions applied in turn, digits split one by one first).
_PRE_TOKENIZERS: dict[str, tuple[str, bool]] = {
    "default": (_GPT2_PATTERN, False),
    "gpt2": (_GPT2_PATTERN, False),
    "smollm": (_GPT2_PATTERN, True),
    "starcoder": (_GPT2_PATTERN, True),
    "llama-bpe": (_LLAMA3_PATTERN, False),
    "llama3": (_LLAMA3_PATTERN, False),
    "qwen2": (_QWEN2_PATTERN, False),
}


class GGUFTokenizer(HFTokenizer):
    """The tokenizer of a GGUF file (same behaviour as :class:`HFTokenizer`).

    Raises:
        ModelLoadError: no tokenizer in the file, an unsupported tokenizer
            model, or a chat template that does not compile.
    """

    def __init__(self, path: str) -> None:
        from pdserve.tokenizer.chat_template import ChatTemplate

        reader = open_gguf(path)
        kind = gguf_value(reader, "tokenizer.ggml.model")
        tokens = gguf_value(reader, "tokenizer.ggml.tokens")
        if kind is None or not tokens:
            raise ModelLoadError(
                f"{path}: the GGUF file has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens); "
                "pdserve needs the tokenizer inside the file"
            )
        types = list(gguf_value(reader, "tokenizer.ggml.token_type", []) or [1] * len(tokens))
        if kind == "gpt2":
            merges = gguf_value(reader, "tokenizer.ggml.merges")
            if not merges:
                raise ModelLoadError(f"{path}: a gpt2 (BPE) tokenizer without tokenizer.ggml.merges")
            pre = str(gguf_value(reader, "tokenizer.ggml.pre", "default"))
            tok = _byte_level_bpe(tokens, merges, pre, path)
            default_add_bos = False
        elif kind == "llama":
            scores = gguf_value(reader, "tokenizer.ggml.scores")
            if not scores:
                raise ModelLoadError(f"{path}: a SentencePiece tokenizer without tokenizer.ggml.scores")
            unk = gguf_value(reader, "tokenizer.ggml.unknown_token_id")
            prefix = bool(gguf_value(reader, "tokenizer.ggml.add_space_prefix", True))
            tok = _sentencepiece_bpe(tokens, scores, types, unk, prefix)
            default_add_bos = True
        else:
            raise ModelLoadError(
                f"{path}: GGUF tokenizer model {kind!r} is not supported; "
                "supported: gpt2 (BPE), llama (SentencePiece)"
            )
        _add_special_tokens(tok, tokens, types)

        def token_at(key: str) -> str | None:
            index = gguf_value(reader, f"tokenizer.ggml.{key}_token_id")
            return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

        special = {
            "bos_token": token_at("bos"),
            "eos_token": token_at("eos"),
            "unk_token": token_at("unknown"),
            "pad_token": token_at("padding"),
        }
        extra_eos = [gguf_value(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
        source = gguf_value(reader, "tokenizer.chat_template")
        template = ChatTemplate(str(source), f"{path} (tokenizer.chat_template)") if source else None
        self._setup(
            tok,
            special,
            add_bos=bool(gguf_value(reader, "tokenizer.ggml.add_bos_token", default_add_bos)),
            add_eos=bool(gguf_value(reader, "tokenizer.ggml.add_eos_token", False)),
            extra_eos_ids=extra_eos,
            chat_template=template,
            name=path,
        )


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str, path: str) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {piece: i for i, piece in enumerate(tokens)}
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ModelLoadError(f"{path}: malformed BPE merge {merge!r}")
        pairs.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    if pre not in _PRE_TOKENIZERS:
        logger.warning("%s: pre-tokenizer %r unknown to pdserve; using GPT-2's", path, pre)
    pattern, split_digits = _PRE_TOKENIZERS.get(pre, _PRE_TOKENIZERS["default"])
    steps: list[Any] = []
    if split_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    steps.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(
    tokens: list[str], scores: list[float], types: list[int], unk_id: int | None, add_prefix: bool
) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {piece: i for i, piece in enumerate(tokens)}
    ranked = []
    for piece, score in zip(tokens, scores, strict=False):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(score), vocab[left], vocab[right], left, right))
    ranked.sort()
    merges = [(left, right) for _, _, _, left, right in ranked]
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Prepend("▁")] if add_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if add_prefix else []
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    return tok


def _add_special_tokens(tok: Any, tokens: list[str], types: list[int]) -> None:
    """Control pieces become special added tokens, user-defined pieces plain added tokens."""
    from tokenizers import AddedToken

    control = [
        AddedToken(t, special=True, normalized=False)
        for t, k in zip(tokens, types, strict=False)
        if k == _CONTROL
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, k in zip(tokens, types, strict=False)
        if k == _USER_DEFINED
    ]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)
