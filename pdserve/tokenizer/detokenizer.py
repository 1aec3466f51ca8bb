"""Incremental detokenization and stop-string matching for one request.

Decoding a request's whole output every step costs O(n²); instead we decode
a short window of recent tokens and emit only the text that became final
(a window ending in an incomplete UTF-8 sequence, shown as U+FFFD, waits for
the next token). Text that could still turn into a stop string is held back
so a streamed response never shows part of a stop string.
"""

from __future__ import annotations

from typing import Protocol

_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    """The one tokenizer call the detokenizer needs."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class Detokenizer:
    """Turns a growing list of output token ids into text, watching for stop strings."""

    def __init__(self, tokenizer: Decoder, stop: list[str]) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: a few tokens of context for the decoder
        self._read_offset = 0  # tokens whose text is already in self.text
        self.text = ""
        self._num_emitted_chars = 0
        self.stop_reason: str | None = None

    def add_tokens(self, token_ids: list[int]) -> None:
        """Append new output tokens; extends ``text`` and sets ``stop_reason`` on a match."""
        for token_id in token_ids:
            if self.stop_reason is not None:
                return
            self._ids.append(token_id)
            prefix = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
            full = self._tokenizer.decode(self._ids[self._prefix_offset :])
            if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
                continue  # no complete character yet
            new_text = full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            search_from = max(len(self.text) - self._holdback, 0)
            self.text += new_text
            self._match_stop(search_from)

    def _match_stop(self, search_from: int) -> None:
        best: tuple[int, str] | None = None
        for stop in self._stop:
            pos = self.text.find(stop, search_from)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, stop)
        if best is not None:
            self.text = self.text[: best[0]]
            self.stop_reason = best[1]

    def flush(self) -> None:
        """At the end of a request: emit what is left, even an incomplete character."""
        if self.stop_reason is None and self._read_offset < len(self._ids):
            prefix = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
            full = self._tokenizer.decode(self._ids[self._prefix_offset :])
            self._read_offset = len(self._ids)
            self.text += full[len(prefix) :]

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out; keeps a possible stop-string prefix back unless finished."""
        if finished:
            self.flush()
        end = len(self.text) if finished or self.stop_reason else len(self.text) - self._holdback
        if end <= self._num_emitted_chars:
            return ""
        delta = self.text[self._num_emitted_chars : end]
        self._num_emitted_chars = end
        return delta
