"""A mixed worker on both sides of KV hand-offs at once, over real shm and tcp transports, in one process.

The parts each role builds (``build_role``) are driven the way a worker loop
drives them: a prefill worker pushes into a mixed worker (P→M), the mixed
worker pushes into a decode worker (M→D) and into another mixed worker
(M→M'), receives from it (M'→M), and serves a request of its own, all in the
same steps over its one cache. Every request's greedy tokens must equal an
aggregated run, KV must have moved into and out of the mixed worker, and
every engine must end with nothing allocated.
"""

from __future__ import annotations

import time

import pytest

from pdserve import LLM, SamplingParams
from pdserve.config import Role
from pdserve.engine.llm import make_engine_config
from pdserve.worker.config import WorkerConfig
from pdserve.worker.roles import RoleParts, build_role

OPTIONS = {"block_size": 16, "chunk_size": 16, "kv_cache_bytes": 8 << 20}
PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


class Node:
    """One worker's role parts, stepped like the worker loop steps them."""

    def __init__(self, name: str, role: Role, transport: str) -> None:
        config = WorkerConfig(make_engine_config("tiny", **OPTIONS), router="tcp://127.0.0.1:1",
                              kv_transport=transport)
        self.name = name
        self.parts: RoleParts = build_role(config, role)
        self.engine = self.parts.engine
        self.tokens: dict[str, list[int]] = {}  # requests decoded here
        self.arrived: list[str] = []  # requests whose KV came in this step

    def step(self) -> None:
        self.arrived = []
        if self.parts.intake is not None:
            for arrival in self.parts.intake.poll():
                out = arrival.output
                self.tokens[out.request_id] = list(out.new_token_ids)
                self.arrived.append(out.request_id)
        if not self.engine.has_unfinished_requests():
            return
        pusher = self.parts.pusher
        for out in self.engine.step(hooks=pusher):
            if out.finish_reason == "prefilled":
                assert pusher is not None
                pusher.prefill_finished(out.request_id, out.new_token_ids[0], None)
            else:
                self.tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        if pusher is not None:
            pusher.after_step()

    def release(self, rid: str) -> None:
        self.engine.release(rid)
        assert self.parts.pusher is not None
        self.parts.pusher.forget(rid)

    def assert_idle(self) -> None:
        stats = self.engine.block_manager.stats()
        assert stats.num_used_blocks == 0 and stats.num_held_requests == 0, (self.name, stats)
        assert not self.engine.has_unfinished_requests()


def hand_off(src: Node, dst: Node, rid: str, prompt: list[int]) -> None:
    """What the router relays: D reserves (``DecodeRequest``), P computes and pushes (``PrefillRequest``)."""
    assert dst.parts.intake is not None and dst.parts.receiver is not None and src.parts.pusher is not None
    d_request = dst.engine.make_request(prompt, PARAMS, rid)
    block_ids = dst.parts.intake.admit(d_request, src.name)
    assert block_ids is not None
    src.parts.pusher.track(rid, dst.name, dst.parts.receiver.descriptor())
    s_request = src.engine.make_request(prompt, PARAMS, rid)
    s_request.prefill_only = True  # as the worker does for every hand-off
    src.engine.enqueue(s_request, gated=True)  # the prefill gate: nothing computed before D reserved
    assert rid in src.engine.scheduler.gated
    src.parts.pusher.set_destination(rid, block_ids, d_request.num_computed_tokens)
    assert src.engine.scheduler.open_gate(rid)


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 200 + 20 for i in range(n)]


@pytest.fixture(scope="module")
def reference() -> LLM:
    return LLM("tiny", **OPTIONS)


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_mixed_worker_is_prefill_decode_and_local_at_once(reference: LLM, transport: str) -> None:
    nodes = {name: Node(name, role, transport) for name, role in
             (("p", Role.PREFILL), ("m", Role.MIXED), ("m2", Role.MIXED), ("d", Role.DECODE))}
    p, m, m2, d = nodes.values()
    try:
        assert m.parts.receiver is not None and m.parts.sender is not None
        assert m.engine.runner.kv_caches is m.parts.receiver.kv_caches  # one cache, both directions
        prompts = {"pm": prompt(1, 50), "md": prompt(2, 70), "mm2": prompt(3, 40), "m2m": prompt(4, 60),
                   "local": prompt(5, 45)}
        routes = {"pm": (p, m), "md": (m, d), "mm2": (m, m2), "m2m": (m2, m)}
        for rid, (src, dst) in routes.items():
            hand_off(src, dst, rid, prompts[rid])
        m.engine.enqueue(m.engine.make_request(prompts["local"], PARAMS, "local"))
        decoder = {rid: dst for rid, (_, dst) in routes.items()} | {"local": m}
        deadline = time.monotonic() + 120
        while any(len(decoder[rid].tokens.get(rid, [])) < PARAMS.max_tokens for rid in prompts):
            assert time.monotonic() < deadline, {n.name: n.tokens for n in nodes.values()}
            for node in nodes.values():
                node.step()
                for rid in node.arrived:  # D acknowledged: P frees its copy (the router's Release)
                    routes[rid][0].release(rid)
        for rid, tokens in prompts.items():
            want = reference.generate([tokens], PARAMS)[0].token_ids
            assert decoder[rid].tokens[rid] == want, rid
        assert m.parts.intake is not None and m.parts.intake.num_bytes_received > 0  # KV into M (P→M, M'→M)
        sent = m.parts.sender.stats()
        assert set(sent.peers) == {"d", "m2"} and all(s.num_bytes > 0 for s in sent.peers.values())
        assert sent.transports == {transport}
        # The requests M only decoded computed no prompt token there; the one it served alone did.
        assert m.engine.num_prompt_tokens_computed == len(prompts["md"]) + len(prompts["mm2"]) + len(
            prompts["local"]
        )
        for node in nodes.values():
            node.assert_idle()
    finally:
        for node in nodes.values():
            node.parts.close()


def test_a_mixed_worker_aborts_a_hand_off_it_computes_and_frees_its_blocks() -> None:
    m, d = Node("m", Role.MIXED, "shm"), Node("d", Role.DECODE, "shm")
    try:
        hand_off(m, d, "r", prompt(7, 60))
        m.step()  # one chunk computed and pushed
        assert m.parts.pusher is not None and d.parts.intake is not None
        d.parts.intake.abort("r")  # quarantined on D until the abort notice
        m.parts.pusher.abort("r")
        m.engine.abort_request("r")
        deadline = time.monotonic() + 10
        while d.engine.block_manager.stats().num_used_blocks:
            assert time.monotonic() < deadline
            d.step()
        m.assert_idle()
        d.assert_idle()
    finally:
        m.parts.close()
        d.parts.close()
