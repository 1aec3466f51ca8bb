"""Jinja chat templates of Hugging Face checkpoints, rendered in a sandbox.

1. :func:`find_chat_template` locates the template: ``tokenizer_config.json``
   (a string, or a list of named templates of which ``default`` or the first
   is taken), else ``chat_template.jinja``, else ``chat_template.json``.
2. :class:`ChatTemplate` compiles it once, in an immutable sandboxed Jinja
   environment (templates come with downloaded checkpoints and are not
   trusted), with the helpers templates expect: ``raise_exception``,
   ``strftime_now`` and a ``tojson`` filter that keeps non-ASCII text.
3. :meth:`ChatTemplate.render` fills in messages, ``add_generation_prompt``
   and the special-token strings (``bos_token``, ``eos_token``, ...).
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pdserve.errors import InvalidRequestError, ModelLoadError


class _TemplateRaised(Exception):
    """Raised by a template's own ``raise_exception(message)`` call."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template.

    Raises:
        ModelLoadError: the template does not compile.
    """

    def __init__(self, source: str, origin: str) -> None:
        self.source = source
        self.origin = origin
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise ModelLoadError(f"chat template from {origin} does not compile: {e}") from e

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        special_tokens: dict[str, str | None],
        extra: dict[str, Any] | None = None,
    ) -> str:
        """The prompt text.

        Raises:
            InvalidRequestError: the template rejected the conversation
                (``raise_exception``) or failed while rendering it.
        """
        context: dict[str, Any] = {"tools": None, "documents": None, **special_tokens}
        context.update(extra or {})
        context.update(messages=messages, add_generation_prompt=add_generation_prompt)
        try:
            return self._template.render(**context)
        except _TemplateRaised as e:
            raise InvalidRequestError(f"chat template rejected the messages: {e}", param="messages") from None
        except (jinja2.TemplateError, TypeError, ValueError, KeyError) as e:
            raise InvalidRequestError(f"chat template failed on these messages: {e}", param="messages") from e


def find_chat_template(model_dir: str, tokenizer_config: dict[str, Any]) -> ChatTemplate | None:
    """The checkpoint's chat template, or None when it has none."""
    origin = os.path.join(model_dir, "tokenizer_config.json")
    source = tokenizer_config.get("chat_template")
    if source is None:
        jinja_path = os.path.join(model_dir, "chat_template.jinja")
        json_path = os.path.join(model_dir, "chat_template.json")
        if os.path.isfile(jinja_path):
            origin = jinja_path
            try:
                with open(jinja_path, encoding="utf-8") as f:
                    source = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise ModelLoadError(f"cannot read {jinja_path}: {e}") from e
        elif os.path.isfile(json_path):
            origin = json_path
            try:
                with open(json_path, encoding="utf-8") as f:
                    source = json.load(f).get("chat_template")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
                raise ModelLoadError(f"{json_path} is not valid: {e}") from e
    if source is None:
        return None
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default") or next(iter(named.values()), None)
    if not isinstance(source, str):
        raise ModelLoadError(
            f"chat template in {origin} must be a string or a list of {{name, template}} objects"
        )
    return ChatTemplate(source, origin)
