"""Tokenizers: text ↔ token ids, and chat messages → prompt text.

Two implementations behind the :class:`Tokenizer` interface:

1. :class:`ByteTokenizer` for the built-in presets: three special ids
   (pad, bos, eos) followed by the 256 byte values, and a fixed chat format.
2. :class:`HFTokenizer` for Hugging Face checkpoints: ``tokenizer.json`` run by
   the ``tokenizers`` library (not transformers, which takes seconds to
   import), special tokens from ``tokenizer_config.json`` /
   ``special_tokens_map.json``, and the checkpoint's Jinja chat template
   rendered in a sandbox.

:func:`load_tokenizer` picks one for a model name. This module must not
import torch.

To tokenize a chat, use :meth:`Tokenizer.encode_chat`: an HF template
writes its own special tokens (e.g. BOS) into the text, so its prompt is
encoded with ``add_special_tokens=False``, while the byte format gets its
BOS from :meth:`Tokenizer.encode`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pdserve.errors import InvalidRequestError, ModelLoadError
from pdserve.jsonfile import read_json_object

if TYPE_CHECKING:
    from pdserve.tokenizer.chat_template import ChatTemplate

Message = dict[str, Any]


class Tokenizer(ABC):
    """What the engine and the servers need from a tokenizer."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows (special tokens included)."""

    @property
    @abstractmethod
    def bos_token_id(self) -> int | None:
        """Beginning-of-sequence id, or None when the model has none."""

    @property
    @abstractmethod
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation (may be several, e.g. end-of-turn tokens)."""

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the model's BOS etc. are added."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; incomplete UTF-8 sequences decode to U+FFFD."""

    @abstractmethod
    def apply_chat_template(
        self,
        messages: list[Message],
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """Prompt text for chat ``messages`` (dicts with ``role`` and ``content``).

        Raises:
            InvalidRequestError: malformed messages, a model without a chat
                template, or a template that rejects the conversation.
        """

    #: Whether :meth:`encode_chat` adds special tokens to the rendered prompt
    #: (HF templates write their own BOS into the text; the byte format does not).
    chat_adds_special_tokens: bool = False

    def encode_chat(
        self,
        messages: list[Message],
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """Token ids of the chat prompt, with exactly the special tokens the model expects."""
        text = self.apply_chat_template(messages, add_generation_prompt, chat_template_kwargs)
        return self.encode(text, add_special_tokens=self.chat_adds_special_tokens)

    @abstractmethod
    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Vocabulary pieces of ``ids`` as the tokenizer stores them (e.g. ``Ġthe``)."""

    def id_to_piece(self, token_id: int) -> str:
        """Readable text of one token, for logprobs output.

        The token decoded on its own; when that is not whole text (a lone
        byte of a multi-byte character) the raw vocabulary piece instead.
        """
        text = self.decode([token_id], skip_special_tokens=False)
        if "\ufffd" in text or not text:
            return self.convert_ids_to_tokens([token_id])[0]
        return text


def _check_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Validate chat messages; flatten OpenAI text parts into one string."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequestError(f"messages[{i}] needs a string 'role'", param="messages")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text"):
                    raise InvalidRequestError(
                        f"messages[{i}].content: only text parts are supported", param="messages"
                    )
                parts.append(str(part.get("text", "")))
            content = "".join(parts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise InvalidRequestError(f"messages[{i}].content must be a string", param="messages")
        out.append({**message, "content": content})
    return out


class ByteTokenizer(Tokenizer):
    """Byte-level tokenizer of the presets: ids 0-2 special, then one id per byte.

    ``vocab_size`` may exceed the 259 byte-level ids (``bench-50m`` has
    32000). Each id beyond the byte range decodes to the placeholder piece
    ``<t{id}>`` (e.g. ``<t31999>``): deterministic, printable ASCII, and
    independent of its neighbours, so decoding a random model's output
    always yields valid text. Placeholders are ordinary (not special) tokens
    and do not round-trip through :meth:`encode`.

    The chat format is ``<|{role}|>\\n{content}\\n`` per message, followed by
    ``<|assistant|>\\n`` when a generation prompt is asked for.
    """

    chat_adds_special_tokens = True
    PAD_ID = 0
    BOS_ID = 1
    EOS_ID = 2
    BYTE_OFFSET = 3
    _SPECIAL_PIECES = ("<pad>", "<s>", "</s>")

    def __init__(self, vocab_size: int = 259) -> None:
        if vocab_size < self.BYTE_OFFSET + 256:
            raise ModelLoadError(
                f"a byte tokenizer needs vocab_size ≥ {self.BYTE_OFFSET + 256}, got {vocab_size}"
            )
        self._vocab_size = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return self.BOS_ID

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (self.EOS_ID,)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.BOS_ID] if add_special_tokens else []
        ids.extend(b + self.BYTE_OFFSET for b in text.encode("utf-8"))
        return ids

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self._vocab_size:
            raise InvalidRequestError(
                f"token id {token_id} is outside the vocabulary [0, {self._vocab_size})"
            )

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        pieces: list[str] = []
        pending = bytearray()  # bytes decode together so multi-byte characters survive
        for token_id in ids:
            token_id = int(token_id)
            self._check_id(token_id)
            byte = token_id - self.BYTE_OFFSET
            if 0 <= byte < 256:
                pending.append(byte)
                continue
            if pending:
                pieces.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            if token_id < self.BYTE_OFFSET:
                if not skip_special_tokens:
                    pieces.append(self._SPECIAL_PIECES[token_id])
            else:
                pieces.append(f"<t{token_id}>")
        if pending:
            pieces.append(pending.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        out = []
        for token_id in ids:
            token_id = int(token_id)
            self._check_id(token_id)
            byte = token_id - self.BYTE_OFFSET
            if token_id < self.BYTE_OFFSET:
                out.append(self._SPECIAL_PIECES[token_id])
            elif byte >= 256:
                out.append(f"<t{token_id}>")
            elif 0x21 <= byte < 0x7F:
                out.append(chr(byte))
            else:
                out.append(f"<0x{byte:02X}>")
        return out

    def apply_chat_template(
        self,
        messages: list[Message],
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        parts = [f"<|{m['role']}|>\n{m['content']}\n" for m in _check_messages(messages)]
        if add_generation_prompt:
            parts.append("<|assistant|>\n")
        return "".join(parts)


#: Vocabulary size of :class:`ByteTokenizer` without placeholder ids.
BYTE_VOCAB_SIZE = ByteTokenizer.BYTE_OFFSET + 256


class HFTokenizer(Tokenizer):
    """A Hugging Face checkpoint's tokenizer, without transformers.

    BOS handling: ``tokenizer.json``'s post-processor adds the special tokens
    it defines; when ``tokenizer_config.json`` says ``add_bos_token: true``
    and the post-processor did not add it, the BOS is prepended (likewise EOS
    for ``add_eos_token``). ``eos_token_ids`` joins the tokenizer's EOS token
    with the ids of ``generation_config.json`` and ``config.json``, so
    end-of-turn tokens stop generation too.

    Raises:
        ModelLoadError: ``tokenizer.json`` missing or unreadable, or a chat
            template that does not compile.
    """

    def __init__(self, model_dir: str) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        from pdserve.tokenizer.chat_template import find_chat_template

        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise ModelLoadError(
                f"{path} not found: pdserve needs a fast-tokenizer tokenizer.json "
                "(sentencepiece-only checkpoints are not supported)"
            )
        try:
            tok = RustTokenizer.from_file(path)
        except Exception as e:  # the Rust library raises plain Exception
            raise ModelLoadError(f"cannot load {path}: {e}") from e
        config = read_json_object(os.path.join(model_dir, "tokenizer_config.json"))
        special_map = read_json_object(os.path.join(model_dir, "special_tokens_map.json"))
        special_tokens: dict[str, str | None] = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = config.get(name, special_map.get(name))
            special_tokens[name] = _token_text(value)
        extra_eos: list[int] = []
        for name in ("generation_config.json", "config.json"):
            value = read_json_object(os.path.join(model_dir, name)).get("eos_token_id")
            extra_eos.extend([value] if isinstance(value, int) else (value or []))
        self._setup(
            tok,
            special_tokens,
            add_bos=config.get("add_bos_token"),
            add_eos=config.get("add_eos_token"),
            extra_eos_ids=extra_eos,
            chat_template=find_chat_template(model_dir, config),
            name=model_dir,
        )

    def _setup(
        self,
        tok: Any,
        special_tokens: dict[str, str | None],
        add_bos: bool | None,
        add_eos: bool | None,
        extra_eos_ids: Sequence[int | None],
        chat_template: ChatTemplate | None,
        name: str,
    ) -> None:
        """Fill in the tokenizer from its parts (shared by every source of HF-style tokenizers)."""
        self._tok = tok
        self._special_tokens = special_tokens
        self._add_bos = add_bos
        self._add_eos = add_eos
        self._bos_id = self._id_of(special_tokens.get("bos_token"))
        self._eos_id = self._id_of(special_tokens.get("eos_token"))
        eos = [self._eos_id, *extra_eos_ids]
        self._eos_ids = tuple(dict.fromkeys(int(i) for i in eos if i is not None))
        self._chat_template = chat_template
        self._model_dir = name

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    @property
    def has_chat_template(self) -> bool:
        """Whether :meth:`apply_chat_template` can be used."""
        return self._chat_template is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens:
            if self._add_bos and self._bos_id is not None and ids[:1] != [self._bos_id]:
                ids.insert(0, self._bos_id)
            if self._add_eos and self._eos_id is not None and ids[-1:] != [self._eos_id]:
                ids.append(self._eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # ids past the tokenizer's vocabulary (padded model vocabularies) decode to nothing
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._tok.id_to_token(int(i)) or f"<t{int(i)}>" for i in ids]

    def apply_chat_template(
        self,
        messages: list[Message],
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        if self._chat_template is None:
            raise InvalidRequestError(
                f"model {self._model_dir!r} has no chat template; "
                "use the completions endpoint with a plain prompt instead",
                param="messages",
            )
        return self._chat_template.render(
            _check_messages(messages),
            add_generation_prompt,
            self._special_tokens,
            chat_template_kwargs,
        )


def _token_text(value: Any) -> str | None:
    """A special token given as a string or an AddedToken dict (``{"content": ...}``)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None



def load_tokenizer(model: str) -> Tokenizer:
    """The tokenizer of a preset, an alias, a GGUF file or a local HF checkpoint folder.

    Raises:
        ModelLoadError: unknown model, or missing / invalid tokenizer files.
    """
    from pdserve.modelspec.aliases import resolve_alias
    from pdserve.modelspec.arch import load_arch_config
    from pdserve.modelspec.gguf_file import is_gguf_file
    from pdserve.modelspec.presets import is_preset

    if is_preset(model):
        return ByteTokenizer(load_arch_config(model).vocab_size)
    model = resolve_alias(model)
    if is_gguf_file(model):
        from pdserve.tokenizer.gguf import GGUFTokenizer

        return GGUFTokenizer(model)
    if not os.path.isdir(model):
        load_arch_config(model)  # raises the error that lists the presets
    return HFTokenizer(model)
