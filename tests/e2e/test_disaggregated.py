"""Disaggregated serving through real processes and the real ``openai`` client.

Outputs must be token-identical to offline ``LLM.generate`` and to aggregated
mode; the KV must really move (decode workers compute no prompt token and
receive exactly the prompt's KV bytes); nothing is left allocated afterwards.
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import openai
import pytest

from pdserve import LLM, SamplingParams
from pdserve.launch.local import LocalLauncher

pytestmark = pytest.mark.slow

BLOCK_SIZE = 16
NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 32  # the tiny preset


def make_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lengths = [1, 2, 15, 16, 17, 31, 33, 64, 95, 130] + [rng.randint(1, 140) for _ in range(n - 10)]
    words = ["alpha", "beta", "gamma", "delta", "kv", "cache", "prefill", "decode", "é", "漢字"]
    prompts = []
    for length in lengths[:n]:
        text = ""
        while len(text.encode()) < length:
            text += rng.choice(words) + " "
        prompts.append(text.encode()[:length].decode(errors="ignore") or "a")
    return prompts


@pytest.fixture(scope="module")
def offline() -> LLM:
    return LLM("tiny", chunk_size=32, block_size=16, kv_cache_bytes=64 << 20)


async def run_completions(
    url: str,
    prompts: list[str],
    max_tokens: int,
    stream: bool,
    temperature: float = 0.0,
    seed: int | None = None,
    **extra_body: object,
) -> list[tuple[str, str | None]]:
    """Send every prompt at once through the openai SDK; (text, finish_reason) per prompt."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    kwargs: dict[str, object] = {"model": "tiny", "max_tokens": max_tokens, "temperature": temperature}
    if seed is not None:
        kwargs["seed"] = seed

    async def one(prompt: str) -> tuple[str, str | None]:
        if stream:
            text, reason = "", None
            events = await client.completions.create(
                prompt=prompt,
                stream=True,
                extra_body=extra_body,
                **kwargs,  # type: ignore[call-overload]
            )
            async for chunk in events:
                text += chunk.choices[0].text
                reason = chunk.choices[0].finish_reason or reason
            return text, reason
        result = await client.completions.create(
            prompt=prompt,
            extra_body=extra_body,
            **kwargs,  # type: ignore[call-overload]
        )
        return result.choices[0].text, result.choices[0].finish_reason

    try:
        return await asyncio.gather(*(one(p) for p in prompts))
    finally:
        await client.close()


def offline_texts(offline: LLM, prompts: list[str], params: SamplingParams) -> list[tuple[str, str | None]]:
    return [(o.text, o.finish_reason) for o in offline.generate(prompts, params)]


def workers(url: str) -> list[dict]:  # type: ignore[type-arg]
    return httpx.get(f"{url}/pdserve/workers", timeout=10).json()["workers"]  # type: ignore[no-any-return]


def wait_idle(url: str, timeout_s: float = 20.0) -> list[dict]:  # type: ignore[type-arg]
    """Wait until every worker reports no used (non-cached) block and no lease."""
    deadline = time.monotonic() + timeout_s
    while True:
        ws = workers(url)
        loads = [w["stats"]["load"] for w in ws]
        if all(
            load["num_free_blocks"] == load["num_total_blocks"] and load["num_held"] == 0 for load in loads
        ):
            return ws
        if time.monotonic() > deadline:
            raise AssertionError(f"workers still hold KV: {loads}")
        time.sleep(0.2)


def expected_kv_bytes(prompts: list[str], offline: LLM) -> int:
    per_block = 2 * NUM_LAYERS * BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM * 4
    total = 0
    for prompt in prompts:
        num_tokens = len(offline.tokenizer.encode(prompt))
        total += -(-num_tokens // BLOCK_SIZE) * per_block
    return total


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_greedy_matches_offline_and_kv_moves(
    transport: str, request: pytest.FixtureRequest, offline: LLM
) -> None:
    launcher: LocalLauncher = request.getfixturevalue(f"disagg_{transport}")
    url = launcher.url
    before = {w["worker_id"]: w["stats"] for w in workers(url)}
    prompts = make_prompts(20, seed=1)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    want = offline_texts(offline, prompts, params)
    got = asyncio.run(run_completions(url, prompts, 24, stream=False, ignore_eos=True))
    assert got == want

    def moved(before: dict[str, dict], after: dict[str, dict]) -> tuple[int, int]:  # type: ignore[type-arg]
        decode_ids = [wid for wid, s in after.items() if s["role"] == "decode"]
        prefill_ids = [wid for wid, s in after.items() if s["role"] == "prefill"]
        assert len(decode_ids) == 2 and len(prefill_ids) == 2
        for wid in decode_ids:
            assert after[wid]["num_prompt_tokens_computed"] == 0, "a decode worker computed prompt tokens"
        for wid in prefill_ids:
            assert after[wid]["transports"] == [transport]
        received = sum(after[w]["kv_bytes_received"] - before[w]["kv_bytes_received"] for w in decode_ids)
        sent = sum(after[w]["kv_bytes_sent"] - before[w]["kv_bytes_sent"] for w in prefill_ids)
        return received, sent

    middle = {w["worker_id"]: w["stats"] for w in wait_idle(url)}
    received, sent = moved(before, middle)
    assert received == sent == expected_kv_bytes(prompts, offline)  # new prompts: every block moves

    got_stream = asyncio.run(run_completions(url, prompts, 24, stream=True, ignore_eos=True))
    assert got_stream == want
    after = {w["worker_id"]: w["stats"] for w in wait_idle(url)}
    received, sent = moved(middle, after)
    # The same prompts again: a decode worker that decoded one already holds its full
    # blocks and only the rest moves (never more than the whole prompts).
    assert received == sent <= expected_kv_bytes(prompts, offline)


def test_seeded_sampling_matches_offline_and_aggregated(
    disagg_shm: LocalLauncher, disagg_tcp: LocalLauncher, aggregated: LocalLauncher, offline: LLM
) -> None:
    prompts = make_prompts(16, seed=2)
    params = SamplingParams(max_tokens=16, temperature=0.9, seed=1234, ignore_eos=True)
    want = offline_texts(offline, prompts, params)
    for launcher in (disagg_shm, disagg_tcp, aggregated):
        got = asyncio.run(
            run_completions(
                launcher.url, prompts, 16, stream=True, temperature=0.9, seed=1234, ignore_eos=True
            )
        )
        assert got == want, launcher.config.mode


def test_aggregated_greedy_matches_offline(aggregated: LocalLauncher, offline: LLM) -> None:
    prompts = make_prompts(16, seed=3)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    got = asyncio.run(run_completions(aggregated.url, prompts, 20, stream=False, ignore_eos=True))
    assert got == offline_texts(offline, prompts, params)
    wait_idle(aggregated.url)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_disaggregated_matches_offline(stream: bool, disagg_tcp: LocalLauncher, offline: LLM) -> None:
    messages = [{"role": "user", "content": "Tell me about disaggregated serving."}]
    want = offline.chat(messages, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    client = openai.OpenAI(base_url=f"{disagg_tcp.url}/v1", api_key="unused", max_retries=0)
    if stream:
        chunks = client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=20,
            temperature=0.0,
            stream=True,  # type: ignore[arg-type]
            extra_body={"ignore_eos": True},
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        for chunk in chunks:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage
        assert usage is not None and usage.completion_tokens == 20
    else:
        result = client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=20,
            temperature=0.0,  # type: ignore[arg-type]
            extra_body={"ignore_eos": True},
        )
        text = result.choices[0].message.content or ""
        assert result.usage is not None and result.usage.prompt_tokens == len(want.prompt_token_ids)
    assert text == want.text
