"""The prefill → decode hand-off in one process, step by step, over the fake transport.

A prefill engine with a :class:`KVPusher` and a decode engine with a
:class:`KVIntake` exchange one request the way the router relays it; the
decoded tokens must equal an aggregated run, the decode engine must compute
no prompt token, and both sides must end with nothing allocated.
"""

from __future__ import annotations

import time

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.engine.engine import LLMEngine, RequestOutput
from pdserve.engine.llm import make_engine_config
from pdserve.transfer.base import KVReceiver, make_receiver, make_sender
from pdserve.transfer.descriptor import KVLayout
from pdserve.worker.decode import KVIntake
from pdserve.worker.prefill import KVPusher

OPTIONS = {"block_size": 16, "chunk_size": 16, "kv_cache_bytes": 8 << 20}
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


class Pair:
    """A prefill engine and a decode engine joined by the fake transport."""

    def __init__(self, sender_options: dict[str, object] | None = None) -> None:
        self.prefill = LLMEngine(make_engine_config("tiny", role="prefill", **OPTIONS), detokenize=False)
        self.receiver: KVReceiver | None = None
        self.decode = LLMEngine(
            make_engine_config("tiny", role="decode", **OPTIONS),
            kv_allocator=self._allocate,
            detokenize=False,
        )
        assert self.receiver is not None
        sender = make_sender(self.prefill.runner.kv_caches, **(sender_options or {}))
        self.pusher = KVPusher(self.prefill, sender)
        self.intake = KVIntake(self.decode, self.receiver, quarantine_s=0.2)

    def _allocate(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> list:  # type: ignore[type-arg]
        layout = KVLayout(num_layers, num_blocks, block_size, heads, head_dim, "float32")
        self.receiver = make_receiver("fake", layout, device)
        return self.receiver.kv_caches

    def start(self, rid: str, prompt: list[int], destination_late: bool = False) -> list[int]:
        d_request = self.decode.make_request(prompt, PARAMS, rid)
        d_block_ids = self.intake.admit(d_request)
        assert d_block_ids is not None
        self.pusher.track(rid, "decode-0", self.receiver.descriptor())  # type: ignore[union-attr]
        self.prefill.enqueue(self.prefill.make_request(prompt, PARAMS, rid))
        if not destination_late:
            self.pusher.set_destination(rid, d_block_ids, d_request.num_computed_tokens)
        return d_block_ids

    def prefill_step(self) -> list[RequestOutput]:
        outs = self.prefill.step(hooks=self.pusher)
        for out in outs:
            if out.finish_reason == "prefilled":
                self.pusher.prefill_finished(out.request_id, out.new_token_ids[0], None)
        self.pusher.after_step()
        return outs

    def assert_idle(self) -> None:
        for engine in (self.prefill, self.decode):
            stats = engine.block_manager.stats()
            assert stats.num_used_blocks == 0 and stats.num_held_requests == 0, stats
            assert not engine.has_unfinished_requests()


@pytest.fixture(scope="module")
def reference() -> LLM:
    return LLM("tiny", **OPTIONS)


@pytest.mark.parametrize("destination_late", [False, True])
def test_handoff_matches_aggregated(reference: LLM, destination_late: bool) -> None:
    pair = Pair()
    prompt = [1, *range(10, 60)]  # 51 tokens: four chunks, four blocks
    d_block_ids = pair.start("r1", prompt, destination_late)
    first_token = None
    for step in range(10):
        for out in pair.prefill_step():
            first_token = out.new_token_ids[0]
        if destination_late and step == 1:
            pair.pusher.set_destination("r1", d_block_ids)  # catches up on the two chunks done so far
        if first_token is not None:
            break
    assert first_token is not None
    # The decode side has every block of the prompt, bit for bit.
    p_blocks = pair.prefill.block_manager.block_ids("r1")
    for (pk, pv), (dk, dv) in zip(pair.prefill.runner.kv_caches, pair.decode.runner.kv_caches, strict=True):
        for src, dst in zip(p_blocks, d_block_ids, strict=False):
            assert torch.equal(pk[src], dk[dst]) and torch.equal(pv[src], dv[dst])
    [arrival] = pair.intake.poll()
    assert arrival.num_bytes > 0 and arrival.output.new_token_ids == [first_token]
    pair.prefill.release("r1")
    pair.pusher.forget("r1")
    tokens = [first_token]
    while pair.decode.has_unfinished_requests():
        for out in pair.decode.step():
            tokens.extend(out.new_token_ids)
    assert tokens == reference.generate([prompt], PARAMS)[0].token_ids
    assert pair.decode.num_prompt_tokens_computed == 0
    pair.assert_idle()


def test_abort_while_kv_in_flight_quarantines_then_frees() -> None:
    pair = Pair()
    pair.start("r1", [1, *range(10, 60)])
    pair.prefill_step()  # one chunk pushed
    pair.intake.abort("r1")
    assert pair.decode.block_manager.stats().num_used_blocks > 0  # still reserved: writes may come
    pair.pusher.abort("r1")
    pair.prefill.abort_request("r1")
    assert pair.intake.poll() == []  # the abort notice frees the blocks
    pair.assert_idle()


def test_quarantine_deadline_frees_blocks_when_prefill_vanishes() -> None:
    pair = Pair()
    pair.start("r1", [1, *range(10, 30)])
    pair.intake.abort("r1")
    pair.prefill.abort_request("r1")  # the prefill side disappears without a word
    pair.pusher.forget("r1")
    assert pair.intake.poll() == []
    assert pair.decode.block_manager.stats().num_used_blocks > 0
    time.sleep(0.25)
    pair.intake.poll()
    pair.assert_idle()


def test_decode_queues_reservations_when_full() -> None:
    pair = Pair()
    capacity = pair.decode.block_manager.num_blocks * 16
    big = [1] * (capacity - 20)
    assert pair.intake.admit(pair.decode.make_request(big, PARAMS, "big")) is not None
    assert pair.intake.admit(pair.decode.make_request([1] * 40, PARAMS, "next")) is None
    assert pair.intake.num_pending == 1
    pair.intake.abort("big")  # nothing was pushed yet: quarantined until the deadline
    time.sleep(0.25)
    pair.intake.poll()
    reserved = pair.intake.retry_pending()
    assert [rid for rid, _, _ in reserved] == ["next"]
    pair.intake.abort("next")
    time.sleep(0.25)
    pair.intake.poll()
    pair.assert_idle()


def test_abort_before_destination_known_frees_decode_blocks_at_once() -> None:
    pair = Pair()
    pair.start("r1", [1, *range(10, 60)], destination_late=True)
    pair.prefill_step()  # computing, but D's block ids have not arrived
    pair.intake.abort("r1")
    pair.pusher.abort("r1")
    pair.prefill.abort_request("r1")
    assert pair.intake.poll() == []  # the abort notice says no write will come
    pair.assert_idle()


def _run_handoff(pair: Pair, rid: str, prompt: list[int]) -> tuple[list[int], int]:
    """One request through P → D to the end; returns its tokens and the KV bytes D received."""
    pair.start(rid, prompt)
    first_token = None
    while first_token is None:
        for out in pair.prefill_step():
            first_token = out.new_token_ids[0]
    [arrival] = pair.intake.poll()
    pair.prefill.release(rid)
    pair.pusher.forget(rid)
    tokens = [first_token]
    while pair.decode.has_unfinished_requests():
        for out in pair.decode.step():
            tokens.extend(out.new_token_ids)
    return tokens, arrival.num_bytes


def test_follow_up_turn_moves_only_new_blocks(reference: LLM) -> None:
    pair = Pair()
    turn1 = [1, *range(10, 60)]  # 51 tokens
    tokens1, bytes1 = _run_handoff(pair, "t1", turn1)
    # The next turn repeats the conversation so far and adds a question: D holds its prefix.
    turn2 = turn1 + tokens1 + list(range(70, 100))
    d_request = pair.decode.make_request(turn2, PARAMS, "t2-probe")
    _, num_cached = pair.decode.block_manager.get_computed_blocks(d_request)
    assert num_cached == (len(turn1) + len(tokens1) - 1) // 16 * 16 > 0
    tokens2, bytes2 = _run_handoff(pair, "t2", turn2)
    bytes_per_block = bytes1 // -(-(len(turn1)) // 16)  # turn 1 moved every block of its prompt
    num_blocks2 = -(-len(turn2) // 16)
    assert bytes2 == bytes_per_block * (num_blocks2 - num_cached // 16)  # only the new blocks moved
    assert tokens2 == reference.generate([turn2], PARAMS)[0].token_ids  # and the output is unchanged
    assert pair.decode.num_prompt_tokens_computed == 0
    pair.assert_idle()
