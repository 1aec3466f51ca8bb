"""Workload generators of ``pdserve bench``: seeded, within bounds, structured as documented."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from pdserve.bench.workload import (
    LengthDist,
    RequestSpec,
    TokenizerCounter,
    WordCounter,
    WorkloadConfig,
    load_sharegpt,
    make_workload,
)
from pdserve.errors import ConfigError


def take(
    config: WorkloadConfig, n: int, counter: WordCounter | TokenizerCounter | None = None
) -> list[RequestSpec]:
    return list(itertools.islice(make_workload(config, counter), n))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("256", LengthDist("fixed", 256)),
        ("fixed:7", LengthDist("fixed", 7)),
        ("uniform:8:16", LengthDist("uniform", 8, 16)),
        ("lognormal:100:0.5", LengthDist("lognormal", 100, 0.5)),
        ("lognormal:100:0.5:10:400", LengthDist("lognormal", 100, 0.5, 10, 400)),
    ],
)
def test_length_spec_parsing(spec: str, expected: LengthDist) -> None:
    assert LengthDist.parse(spec) == expected


@pytest.mark.parametrize(
    "spec", ["", "x", "uniform:9", "uniform:9:3", "lognormal:100", "gauss:1:2", "0", "-4"]
)
def test_bad_length_specs_are_rejected_with_the_accepted_forms(spec: str) -> None:
    with pytest.raises(ConfigError, match=r"N|uniform|lognormal|≥"):
        LengthDist.parse(spec)


def test_length_samples_stay_within_bounds_and_follow_the_distribution() -> None:
    rng = random.Random(0)
    uniform = [LengthDist.parse("uniform:10:20").sample(rng) for _ in range(4000)]
    assert min(uniform) == 10 and max(uniform) == 20
    assert 14.5 < sum(uniform) / len(uniform) < 15.5
    clipped = [LengthDist.parse("lognormal:100:1.0:50:150").sample(rng) for _ in range(4000)]
    assert min(clipped) == 50 and max(clipped) == 150  # sigma 1 reaches both clips
    free = sorted(LengthDist.parse("lognormal:100:0.3").sample(rng) for _ in range(4001))
    assert 95 <= free[2000] <= 105  # the median is the given median


def test_same_seed_same_requests_other_seed_other_requests() -> None:
    for kind in ("synthetic", "chat", "summarization", "shared-prefix"):
        a = take(WorkloadConfig(kind=kind, seed=3), 20)
        b = take(WorkloadConfig(kind=kind, seed=3), 20)
        c = take(WorkloadConfig(kind=kind, seed=4), 20)
        assert a == b, kind
        assert a != c, kind


def test_synthetic_lengths_in_words_match_the_request() -> None:
    specs = take(WorkloadConfig(input_len="uniform:5:50", output_len="lognormal:30:0.5:4:64"), 300)
    for s in specs:
        assert 5 <= len(s.prompt().split()) <= 50
        assert len(s.prompt().split()) == s.num_prompt_tokens
        assert 4 <= s.max_tokens <= 64
    assert len({s.max_tokens for s in specs}) > 20  # really drawn, not fixed


def test_chat_and_summarization_mixes_have_their_documented_ranges() -> None:
    chat = take(WorkloadConfig(kind="chat"), 300)
    assert all(16 <= s.num_prompt_tokens <= 1024 and 8 <= s.max_tokens <= 512 for s in chat)
    summ = take(WorkloadConfig(kind="summarization"), 100)
    assert all(s.prompt().startswith("Summarize the following document.") for s in summ)
    assert all(512 <= s.num_prompt_tokens <= 3072 for s in summ)
    assert sum(s.num_prompt_tokens for s in summ) / 100 > 4 * sum(s.num_prompt_tokens for s in chat) / 300


def test_exact_token_counts_with_a_pdserve_tokenizer() -> None:
    counter = TokenizerCounter("tiny")  # byte-level: one token per byte
    specs = take(WorkloadConfig(input_len="uniform:30:300", output_len="8"), 50, counter)
    for s in specs:
        assert len(s.prompt().encode()) == s.num_prompt_tokens
        assert 30 <= s.num_prompt_tokens <= 300


def test_shared_prefix_structure() -> None:
    config = WorkloadConfig(
        kind="shared-prefix", num_prefixes=3, users_per_prefix=2, turns=3, prefix_len=40, output_len="5"
    )
    round_one = take(config, 3 * 2 * 3)
    systems = {s.messages[0] for s in round_one}
    assert len(systems) == 3 and all(role == "system" and len(t.split()) == 40 for role, t in systems)
    # turn t of every conversation comes before turn t+1 of any
    assert [s.turn for s in round_one] == [0] * 6 + [1] * 6 + [2] * 6
    by_conv: dict[int | None, list[RequestSpec]] = {}
    for s in round_one:
        by_conv.setdefault(s.conversation_id, []).append(s)
    assert len(by_conv) == 6
    for turns in by_conv.values():
        for earlier, later in itertools.pairwise(turns):
            # the later turn repeats the earlier one, then an assistant reply and a new user message
            assert later.messages[: len(earlier.messages)] == earlier.messages
            assert [r for r, _ in later.messages[len(earlier.messages) :]] == ["assistant", "user"]
            assert len(later.messages[len(earlier.messages)][1].split()) == earlier.max_tokens
        assert turns[-1].prompt().startswith("System: ")  # completions see a transcript with a stable prefix
        assert turns[-1].prompt().startswith(turns[0].prompt().removesuffix("Assistant:"))
    users_per_system = {
        sys_msg: {c for c, t in by_conv.items() if t[0].messages[0] == sys_msg} for sys_msg in systems
    }
    assert all(len(users) == 2 for users in users_per_system.values())
    # the next round keeps the system prompts and brings new users
    round_two = take(config, 2 * 18)[18:]
    assert {s.messages[0] for s in round_two} == systems
    assert {s.conversation_id for s in round_two}.isdisjoint(by_conv)


def _write_sharegpt(path: Path) -> Path:
    def conv(*turns: tuple[str, str]) -> dict[str, object]:
        return {"conversations": [{"from": who, "value": text} for who, text in turns]}

    data = [
        conv(("human", "one two three"), ("gpt", "a b c d e")),
        conv(("system", "be nice"), ("human", "hi there"), ("gpt", "hello"), ("human", "more")),
        conv(("gpt", "starts with gpt"), ("human", "x")),
        conv(("human", "no answer")),
        {"id": "no conversations"},
        conv(("user", " ".join(["w"] * 50)), ("assistant", "ok")),
    ]
    path.write_text(json.dumps(data))
    return path


def test_sharegpt_parsing_keeps_first_human_turn_and_its_reply(tmp_path: Path) -> None:
    pairs = load_sharegpt(_write_sharegpt(tmp_path / "sg.json"))
    assert pairs == [("one two three", "a b c d e"), ("hi there", "hello"), (" ".join(["w"] * 50), "ok")]


def test_sharegpt_workload_lengths_filter_and_cycle(tmp_path: Path) -> None:
    path = _write_sharegpt(tmp_path / "sg.json")
    specs = take(WorkloadConfig(kind="sharegpt", dataset=str(path), max_prompt_tokens=10, seed=1), 8)
    assert {s.prompt() for s in specs} == {"one two three", "hi there"}  # the 50-word prompt is filtered
    for s in specs:
        assert s.max_tokens == {"one two three": 5, "hi there": 1}[s.prompt()]  # the reply's length
    fixed = take(WorkloadConfig(kind="sharegpt", dataset=str(path), output_len="7"), 4)
    assert all(s.max_tokens == 7 for s in fixed)


def test_sharegpt_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--dataset"):
        WorkloadConfig(kind="sharegpt")
    bad = tmp_path / "bad.json"
    bad.write_text('{"conversations": []}')
    with pytest.raises(ConfigError, match="JSON list"):
        load_sharegpt(bad)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ConfigError, match="no conversation"):
        load_sharegpt(empty)


def test_unknown_workload_kind_lists_the_kinds() -> None:
    with pytest.raises(ConfigError, match="synthetic, chat, summarization, shared-prefix, sharegpt"):
        WorkloadConfig(kind="nope")
