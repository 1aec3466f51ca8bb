"""What the load generator sends: seeded, reproducible streams of requests.

1. A :class:`LengthDist` says how many tokens a prompt or an output has
   (``256``, ``uniform:128:512``, ``lognormal:MEDIAN:SIGMA[:MIN:MAX]``).
2. A :class:`TokenCounter` turns a token budget into text. The tool does not
   know the server's tokenizer: without one, **one word ≈ one token** (the
   words are short common English words, one token each in the usual BPE
   vocabularies; a byte-level tokenizer such as pdserve's presets counts about
   six tokens per word). ``--tokenizer tiny|bench-50m|/path/to/hf-dir`` uses
   pdserve's own tokenizer instead, for exact counts. The server's ``usage``
   always wins over these estimates in the results.
3. :func:`make_workload` returns an endless iterator of :class:`RequestSpec`
   for one workload kind; the same seed gives the same requests.

Kinds: ``synthetic`` (lengths from ``--input-len`` / ``--output-len``),
``chat`` and ``summarization`` (preset length mixes), ``shared-prefix``
(system prompts shared by several users, multi-turn: turn k repeats turns
1..k-1, with a synthetic assistant reply of the turn's output length) and
``sharegpt`` (a ShareGPT-format JSON file).
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pdserve.errors import ConfigError

WORKLOAD_KINDS = ("synthetic", "chat", "summarization", "shared-prefix", "sharegpt")

# Short, common words: one token each in GPT-2/Llama-style BPE vocabularies (with the leading space).
_WORD_TEXT = """
the of and to in is was for on that with as by at from his he it an are were which be this has
had not but also have one their first its they new after who or two been her she more all time
when there other during into would school most only over city some years can may about up out
used between three both world then these many work well under known like part year where game
while before later made four area through being same team state each back home high film since
such life group end day include number left found take line water light house power music book
story place name point small road great long side war five river play town show old set north
south east west early late best still own again against often just what so very good way did
see because even any those people down them than make could now him last how no our must should
help keep start give run move live hold turn open close ask need feel try leave call come go
know think look want use find
"""
_WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())


@dataclass(frozen=True)
class LengthDist:
    """A distribution of token counts: ``N``, ``uniform:LO:HI`` or ``lognormal:MEDIAN:SIGMA[:MIN:MAX]``."""

    kind: str
    a: float
    b: float = 0.0
    lo: int = 1
    hi: int = 1 << 30

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "lognormal"):
            raise ConfigError(f"length distribution {self.kind!r}: use fixed, uniform or lognormal")
        if self.kind == "fixed" and self.a < 1:
            raise ConfigError(f"a fixed length must be ≥ 1, got {self.a:g}")
        if self.kind == "uniform" and not 1 <= self.a <= self.b:
            raise ConfigError(f"uniform:{self.a:g}:{self.b:g} needs 1 ≤ LO ≤ HI")
        if self.kind == "lognormal" and (self.a < 1 or self.b < 0):
            raise ConfigError(f"lognormal:{self.a:g}:{self.b:g} needs MEDIAN ≥ 1 and SIGMA ≥ 0")
        if not 1 <= self.lo <= self.hi:
            raise ConfigError(f"length bounds [{self.lo}, {self.hi}] need 1 ≤ MIN ≤ MAX")

    @classmethod
    def parse(cls, spec: str) -> LengthDist:
        """Read ``256`` / ``fixed:256``, ``uniform:128:512``, ``lognormal:256:0.8[:16:1024]``."""
        parts = spec.strip().split(":")
        try:
            if len(parts) == 1 or (parts[0] == "fixed" and len(parts) == 2):
                return cls("fixed", float(int(parts[-1])))
            if parts[0] == "uniform" and len(parts) == 3:
                return cls("uniform", float(int(parts[1])), float(int(parts[2])))
            if parts[0] == "lognormal" and len(parts) in (3, 5):
                bounds = (int(parts[3]), int(parts[4])) if len(parts) == 5 else (1, 1 << 30)
                return cls("lognormal", float(parts[1]), float(parts[2]), *bounds)
        except ValueError:
            pass
        raise ConfigError(
            f"cannot read length {spec!r}: use N, fixed:N, uniform:LO:HI or lognormal:MEDIAN:SIGMA[:MIN:MAX]"
        )

    def sample(self, rng: random.Random) -> int:
        """One length, at least 1."""
        if self.kind == "fixed":
            n = int(self.a)
        elif self.kind == "uniform":
            n = rng.randint(int(self.a), int(self.b))
        else:
            n = round(self.a * math.exp(rng.gauss(0.0, self.b)))
        return max(self.lo, min(self.hi, n))


class TokenCounter(Protocol):
    """Counts tokens of text and writes text of a given token count."""

    name: str

    def count(self, text: str) -> int:
        """Tokens in ``text`` (no special tokens)."""
        ...

    def text(self, num_tokens: int, rng: random.Random) -> str:
        """Random text of ``num_tokens`` tokens."""
        ...


class WordCounter:
    """The default approximation: one word is one token."""

    name = "words"

    def count(self, text: str) -> int:
        return len(text.split())

    def text(self, num_tokens: int, rng: random.Random) -> str:
        return " ".join(rng.choices(_WORDS, k=num_tokens))


class TokenizerCounter:
    """Exact counts with one of pdserve's tokenizers (a preset name or an HF checkpoint folder)."""

    def __init__(self, model: str) -> None:
        from pdserve.tokenizer import load_tokenizer  # torch-free

        self.name = model
        self._tokenizer = load_tokenizer(model)

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    def text(self, num_tokens: int, rng: random.Random) -> str:
        num_words = max(num_tokens, 1)
        while True:  # a word is at least one token in the usual vocabularies; grow if not
            ids = self._tokenizer.encode(" ".join(rng.choices(_WORDS, k=num_words)), add_special_tokens=False)
            if len(ids) >= num_tokens:
                return self._tokenizer.decode(ids[:num_tokens]).strip()
            num_words *= 2


def make_counter(tokenizer: str | None) -> TokenCounter:
    """The word approximation (None), or exact counts with pdserve's tokenizer ``tokenizer``."""
    return WordCounter() if tokenizer is None else TokenizerCounter(tokenizer)


@dataclass(frozen=True)
class RequestSpec:
    """One request to send.

    Attributes:
        messages: (role, content) pairs; the completions endpoint gets :meth:`prompt`.
        max_tokens: output tokens asked for.
        num_prompt_tokens: the workload's count of the prompt (estimate; the server's usage wins).
        conversation_id, turn: position in a multi-turn workload (None / 0 otherwise).
    """

    messages: tuple[tuple[str, str], ...]
    max_tokens: int
    num_prompt_tokens: int
    conversation_id: int | None = None
    turn: int = 0

    def prompt(self) -> str:
        """Prompt text for ``/v1/completions``: a lone user message as is, else a role-tagged transcript."""
        if len(self.messages) == 1 and self.messages[0][0] == "user":
            return self.messages[0][1]
        lines = [f"{role.capitalize()}: {content}" for role, content in self.messages]
        return "\n".join([*lines, "Assistant:"])

    def chat_messages(self) -> list[dict[str, str]]:
        """Messages for ``/v1/chat/completions``."""
        return [{"role": role, "content": content} for role, content in self.messages]


#: (prompt, output) length specs of each kind when --input-len / --output-len are not given.
DEFAULT_LENGTHS: dict[str, tuple[str, str]] = {
    "synthetic": ("256", "128"),
    "chat": ("lognormal:200:0.9:16:1024", "lognormal:100:0.9:8:512"),
    "summarization": ("lognormal:1536:0.4:512:3072", "lognormal:96:0.5:16:256"),
    "shared-prefix": ("lognormal:64:0.5:8:256", "lognormal:64:0.5:8:256"),
    "sharegpt": ("1", "1"),  # lengths come from the file unless --output-len is given
}


@dataclass(frozen=True)
class WorkloadConfig:
    """Which requests to generate.

    Attributes:
        kind: one of ``WORKLOAD_KINDS``.
        input_len, output_len: length specs (see :meth:`LengthDist.parse`); None takes the kind's default.
        seed: seeds every random choice.
        num_prefixes, users_per_prefix, turns, prefix_len: shape of ``shared-prefix``.
        dataset: path of the ShareGPT JSON file (``sharegpt``).
        max_prompt_tokens: ShareGPT prompts longer than this are skipped.
    """

    kind: str = "synthetic"
    input_len: str | None = None
    output_len: str | None = None
    seed: int = 0
    num_prefixes: int = 4
    users_per_prefix: int = 8
    turns: int = 3
    prefix_len: int = 512
    dataset: str | None = None
    max_prompt_tokens: int = 4096

    def __post_init__(self) -> None:
        if self.kind not in WORKLOAD_KINDS:
            raise ConfigError(f"workload {self.kind!r}: use one of {', '.join(WORKLOAD_KINDS)}")
        if self.kind == "sharegpt" and not self.dataset:
            raise ConfigError("the sharegpt workload needs --dataset PATH")
        for name in ("num_prefixes", "users_per_prefix", "turns", "prefix_len", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for spec in (self.input_len, self.output_len):
            if spec is not None:
                LengthDist.parse(spec)

    def lengths(self) -> tuple[LengthDist, LengthDist]:
        """The prompt and output length distributions in force."""
        default_in, default_out = DEFAULT_LENGTHS[self.kind]
        return LengthDist.parse(self.input_len or default_in), LengthDist.parse(
            self.output_len or default_out
        )


def make_workload(config: WorkloadConfig, counter: TokenCounter | None = None) -> Iterator[RequestSpec]:
    """An endless, seeded stream of requests of ``config.kind``."""
    counter = counter or WordCounter()
    rng = random.Random(config.seed)
    if config.kind in ("synthetic", "chat"):
        return _single_turn(config, counter, rng, instruction="")
    if config.kind == "summarization":
        return _single_turn(config, counter, rng, instruction="Summarize the following document.\n\n")
    if config.kind == "shared-prefix":
        return _shared_prefix(config, counter, rng)
    return _sharegpt(config, counter, rng)


def _single_turn(
    config: WorkloadConfig, counter: TokenCounter, rng: random.Random, instruction: str
) -> Iterator[RequestSpec]:
    input_len, output_len = config.lengths()
    num_instruction_tokens = counter.count(instruction)
    while True:
        n_in = input_len.sample(rng)
        n_out = output_len.sample(rng)
        body = counter.text(max(1, n_in - num_instruction_tokens), rng)
        prompt = instruction + body
        yield RequestSpec((("user", prompt),), n_out, num_instruction_tokens + counter.count(body))


def _shared_prefix(
    config: WorkloadConfig, counter: TokenCounter, rng: random.Random
) -> Iterator[RequestSpec]:
    """Rounds of ``num_prefixes × users_per_prefix`` conversations; each round has fresh users.

    Within a round, turn t of every conversation is sent before turn t+1 of any,
    so a conversation's turns are spread out the way real users' are.
    """
    input_len, output_len = config.lengths()
    systems = [counter.text(config.prefix_len, rng) for _ in range(config.num_prefixes)]
    conversation_ids = itertools.count()
    while True:
        # [conversation] → (id, system index, history so far)
        convs = [
            (next(conversation_ids), s, [("system", systems[s])])
            for s in range(config.num_prefixes)
            for _ in range(config.users_per_prefix)
        ]
        for turn in range(config.turns):
            for cid, _, history in convs:
                history.append(("user", counter.text(input_len.sample(rng), rng)))
                n_out = output_len.sample(rng)
                messages = tuple(history)
                num_prompt = sum(counter.count(content) for _, content in messages)
                yield RequestSpec(messages, n_out, num_prompt, conversation_id=cid, turn=turn)
                # the next turn repeats this one with a stand-in reply of the asked length
                history.append(("assistant", counter.text(n_out, rng)))


def load_sharegpt(path: str | Path) -> list[tuple[str, str]]:
    """(first human message, the reply to it) of every usable ShareGPT conversation.

    The file is a JSON list of ``{"conversations": [{"from": "human"|"gpt", "value": str}, ...]}``
    (``user``/``assistant`` are accepted too; a leading ``system`` turn is skipped).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read ShareGPT file {path}: {exc}") from exc
    if not isinstance(data, list):
        raise ConfigError(f"{path}: a ShareGPT file holds a JSON list of conversations")
    pairs = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            continue
        turns = [t for t in turns if isinstance(t, dict) and t.get("from") != "system"]
        if len(turns) < 2:
            continue
        first, second = turns[0], turns[1]
        if first.get("from") not in ("human", "user") or second.get("from") not in ("gpt", "assistant"):
            continue
        prompt, reply = first.get("value"), second.get("value")
        if isinstance(prompt, str) and isinstance(reply, str) and prompt.strip():
            pairs.append((prompt, reply))
    if not pairs:
        raise ConfigError(f"{path}: no conversation starts with a human turn answered by a gpt turn")
    return pairs


def _sharegpt(config: WorkloadConfig, counter: TokenCounter, rng: random.Random) -> Iterator[RequestSpec]:
    """The file's first turns in a seeded order, again and again; output length = the reply's length."""
    assert config.dataset is not None
    fixed_output = LengthDist.parse(config.output_len) if config.output_len else None
    usable = []
    for prompt, reply in load_sharegpt(config.dataset):
        num_prompt = counter.count(prompt)
        if num_prompt <= config.max_prompt_tokens:
            usable.append((prompt, num_prompt, max(1, counter.count(reply))))
    if not usable:
        raise ConfigError(f"{config.dataset}: every prompt is longer than {config.max_prompt_tokens} tokens")
    while True:
        order = list(range(len(usable)))
        rng.shuffle(order)
        for i in order:
            prompt, num_prompt, num_reply = usable[i]
            n_out = fixed_output.sample(rng) if fixed_output else num_reply
            yield RequestSpec((("user", prompt),), n_out, num_prompt)
