"""Tokenizers: the presets' byte tokenizer and HF tokenizer.json checkpoints."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pdserve.errors import InvalidRequestError, ModelLoadError
from pdserve.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


def random_text(seed: int, length: int = 200) -> str:
    gen = random.Random(seed)
    ranges = [
        (0x20, 0x7E),
        (0x00, 0x1F),
        (0xA0, 0x2FF),
        (0x4E00, 0x9FFF),
        (0x1F300, 0x1FAFF),
        (0xE000, 0xF8FF),
        (0x10000, 0x10FFFF),
    ]
    chars = []
    for _ in range(length):
        lo, hi = gen.choice(ranges)
        chars.append(chr(gen.randint(lo, hi)))
    return "".join(chars)


@pytest.mark.parametrize("seed", range(5))
def test_byte_tokenizer_round_trips_arbitrary_unicode(seed: int) -> None:
    tok = ByteTokenizer()
    text = random_text(seed)
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert len(ids) == 1 + len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_byte_tokenizer_specials() -> None:
    tok = ByteTokenizer()
    ids = [*tok.encode("hi"), tok.EOS_ID]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>hi</s>"
    assert tok.eos_token_ids == (2,)
    assert tok.vocab_size == 259


def test_high_ids_decode_to_placeholders() -> None:
    tok = load_tokenizer("bench-50m")
    assert tok.vocab_size == 32000
    ids = [*tok.encode("a", add_special_tokens=False), 31999, 259, *tok.encode("é", False)]
    assert tok.decode(ids) == "a<t31999><t259>é"
    assert tok.decode(ids) == tok.decode(list(ids))  # deterministic
    assert tok.convert_ids_to_tokens([31999]) == ["<t31999>"]
    with pytest.raises(InvalidRequestError, match="32000"):
        tok.decode([32000])


def test_byte_pieces_for_logprobs() -> None:
    tok = ByteTokenizer()
    a, space, e_acute_first = tok.encode("a é", add_special_tokens=False)[:3]
    assert tok.convert_ids_to_tokens([a, space, e_acute_first]) == ["a", "<0x20>", "<0xC3>"]
    assert tok.id_to_piece(space) == " "
    assert tok.id_to_piece(e_acute_first) == "<0xC3>"  # half a character: the raw piece


def test_byte_chat_template() -> None:
    tok = load_tokenizer("tiny")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages) == ("<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n")
    assert tok.apply_chat_template(messages, add_generation_prompt=False).endswith("Hi\n")
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert tok.apply_chat_template(parts) == "<|user|>\nab\n<|assistant|>\n"
    with pytest.raises(InvalidRequestError, match="role"):
        tok.apply_chat_template([{"content": "no role"}])
    with pytest.raises(InvalidRequestError, match="non-empty"):
        tok.apply_chat_template([])


def write_hf_tokenizer(path: Path, config: dict, special_map: dict | None = None) -> None:
    """A tiny word-level tokenizer.json plus the given tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if special_map is not None:
        (path / "special_tokens_map.json").write_text(json.dumps(special_map))


def test_hf_tokenizer_without_chat_template_says_so(tmp_path: Path) -> None:
    write_hf_tokenizer(
        tmp_path, {"add_bos_token": False}, special_map={"bos_token": "<s>", "eos_token": {"content": "</s>"}}
    )
    tok = HFTokenizer(str(tmp_path))
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    assert tok.encode("hello world") == [3, 4]
    assert not tok.has_chat_template
    with pytest.raises(InvalidRequestError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hello"}])


def test_hf_chat_template_from_list_with_tojson_and_raise(tmp_path: Path) -> None:
    template = (
        "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}"
        "{% endif %}{{ m | tojson }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    write_hf_tokenizer(
        tmp_path,
        {
            "bos_token": "<s>",
            "chat_template": [
                {"name": "tool_use", "template": "unused"},
                {"name": "default", "template": template},
            ],
        },
    )
    tok = HFTokenizer(str(tmp_path))
    out = tok.apply_chat_template([{"role": "user", "content": "héllo"}])
    assert out == '{"role": "user", "content": "héllo"}>'
    with pytest.raises(InvalidRequestError, match="no tools"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_hf_chat_template_jinja_file_and_sandbox(tmp_path: Path) -> None:
    write_hf_tokenizer(tmp_path, {"eos_token": "</s>"})
    (tmp_path / "chat_template.jinja").write_text(
        "{{ messages[0].content }}{{ eos_token }}{{ ''.__class__.__mro__ }}"
    )
    tok = load_tokenizer(str(tmp_path))
    with pytest.raises(InvalidRequestError, match="chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}{{ eos_token }}")
    tok = load_tokenizer(str(tmp_path))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi</s>"


def test_hf_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"tokenizer.json not found"):
        HFTokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot load"):
        HFTokenizer(str(tmp_path))
    write_hf_tokenizer(tmp_path, {"chat_template": "{% for %}"})
    with pytest.raises(ModelLoadError, match="does not compile"):
        HFTokenizer(str(tmp_path))
    with pytest.raises(ModelLoadError, match="preset"):
        load_tokenizer(str(tmp_path / "missing"))


def test_byte_encode_chat_starts_with_bos() -> None:
    tok = load_tokenizer("tiny")
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids) == "<|user|>\nHi\n<|assistant|>\n"
