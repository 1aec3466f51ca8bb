"""Scheduler lifecycle, driven by hand: schedule → fake execute → update, no leaks."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pdserve.config import Role, SchedulerConfig
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.scheduler import Scheduler, SchedulerOutput
from pdserve.request import Request, RequestStatus, TokenLogprobs
from pdserve.sampling_params import SamplingParams

EOS = 0


@dataclass
class FakeToken:
    token_id: int
    logprobs: TokenLogprobs | None = None


def make(rid: str, num_prompt: int, max_tokens: int = 4, **kw: object) -> Request:
    params = SamplingParams(max_tokens=max_tokens, **kw)  # type: ignore[arg-type]
    return Request(rid, [10 + i for i in range(num_prompt)], params, eos_token_ids=(EOS,))


def make_scheduler(
    num_blocks: int = 64, block_size: int = 4, prefix_caching: bool = True, **kw: object
) -> Scheduler:
    config = SchedulerConfig(**kw)  # type: ignore[arg-type]
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    return Scheduler(config, bm, max_model_len=1024)


def fake_execute(out: SchedulerOutput, token: int = 7) -> list[FakeToken | None]:
    return [FakeToken(token) if s.samples else None for s in out.scheduled]


def run_to_completion(sched: Scheduler, max_steps: int = 1000) -> list[SchedulerOutput]:
    steps = []
    while sched.has_unfinished_requests():
        out = sched.schedule()
        steps.append(out)
        sched.update(out, fake_execute(out))
        assert len(steps) < max_steps, "scheduler made no progress"
    return steps


def assert_no_leaks(sched: Scheduler) -> None:
    stats = sched.block_manager.stats()
    assert stats.num_used_blocks == 0, stats
    assert not sched.running and not sched.waiting and not sched.waiting_for_kv and not sched.held


def test_continuous_batching_joins_and_leaves() -> None:
    sched = make_scheduler(max_num_batched_tokens=64)
    a, b = make("a", 5, max_tokens=2), make("b", 3, max_tokens=5)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 5), ("b", 3)]
    sched.update(out, fake_execute(out))
    c = make("c", 4, max_tokens=1)
    sched.add_request(c)
    out = sched.schedule()
    # a and b decode one token each, c joins with its whole prompt in the same step.
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [
        ("a", 1), ("b", 1), ("c", 4)
    ]
    finished = [r.request_id for r in sched.update(out, fake_execute(out)) if r.finished]
    assert finished == ["a", "c"]
    assert [r.request_id for r in sched.running] == ["b"]
    run_to_completion(sched)
    assert b.num_output_tokens == 5 and b.finish_reason == "length"
    assert_no_leaks(sched)


def test_chunked_prefill_respects_chunk_size_and_budget() -> None:
    sched = make_scheduler(max_num_batched_tokens=8, chunk_size=5)
    a = make("a", 12, max_tokens=1)
    b = Request("b", [500 + i for i in range(6)], SamplingParams(max_tokens=1), eos_token_ids=(EOS,))
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 5), ("b", 3)]
    assert not any(s.samples for s in out.scheduled)
    sched.update(out, fake_execute(out))
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 5), ("b", 3)]
    assert out.scheduled[1].samples  # b's prompt is complete: it samples
    sched.update(out, fake_execute(out))
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 2)]
    sched.update(out, fake_execute(out))
    assert a.finished and b.finished
    assert_no_leaks(sched)


def test_without_chunking_a_prompt_runs_whole_even_past_the_budget() -> None:
    sched = make_scheduler(max_num_batched_tokens=8, enable_chunked_prefill=False)
    sched.add_request(make("long", 20, max_tokens=1))
    sched.add_request(make("short", 3, max_tokens=1))
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("long", 20)]
    sched.update(out, fake_execute(out))
    run_to_completion(sched)
    assert_no_leaks(sched)


def test_max_num_seqs_limits_running() -> None:
    sched = make_scheduler(max_num_seqs=2)
    for i in range(4):
        sched.add_request(make(f"r{i}", 2, max_tokens=3))
    out = sched.schedule()
    assert len(out.scheduled) == 2
    run_to_completion(sched)
    assert_no_leaks(sched)


def test_preemption_by_recompute_when_blocks_run_out() -> None:
    # 6 blocks of 2 tokens: two requests of 4-token prompts fill 4 blocks, then grow.
    sched = make_scheduler(num_blocks=6, block_size=2, max_num_batched_tokens=64)
    a, b = make("a", 4, max_tokens=6), make("b", 4, max_tokens=6)
    sched.add_request(a)
    sched.add_request(b)
    steps = run_to_completion(sched)
    assert sched.num_preemptions >= 1
    assert any("b" in s.preempted_ids for s in steps)  # the later arrival is the victim
    assert b.num_preemptions >= 1 and a.num_preemptions == 0
    assert a.num_output_tokens == 6 and b.num_output_tokens == 6
    assert_no_leaks(sched)


def test_recompute_after_preemption_covers_prompt_and_outputs() -> None:
    sched = make_scheduler(num_blocks=5, block_size=2, prefix_caching=False, max_num_batched_tokens=64)
    a, b = make("a", 4, max_tokens=5), make("b", 4, max_tokens=5)
    sched.add_request(a)
    sched.add_request(b)
    seen_recompute = False
    while sched.has_unfinished_requests():
        out = sched.schedule()
        for s in out.scheduled:
            if s.request is b and b.num_preemptions and s.num_computed_tokens == 0:
                assert s.num_new_tokens == b.num_tokens  # prompt + outputs so far
                seen_recompute = b.num_output_tokens > 0 or seen_recompute
        sched.update(out, fake_execute(out))
    assert seen_recompute
    assert_no_leaks(sched)


def test_stop_conditions() -> None:
    sched = make_scheduler()
    eos = make("eos", 3, max_tokens=10)
    ignore = make("ignore", 3, max_tokens=3, ignore_eos=True)
    stop_id = make("stopid", 3, max_tokens=10, stop_token_ids=[7])
    min_tok = make("min", 3, max_tokens=10, min_tokens=2)
    for r in (eos, ignore, stop_id, min_tok):
        sched.add_request(r)
    out = sched.schedule()
    sched.update(out, [FakeToken(EOS), FakeToken(EOS), FakeToken(7), FakeToken(EOS)])
    assert eos.status is RequestStatus.FINISHED_STOPPED
    assert stop_id.status is RequestStatus.FINISHED_STOPPED and stop_id.stop_reason == 7
    assert not ignore.finished and not min_tok.finished
    for _ in range(2):
        out = sched.schedule()
        sched.update(out, [FakeToken(EOS) for _ in out.scheduled])
    assert ignore.status is RequestStatus.FINISHED_LENGTH and ignore.num_output_tokens == 3
    assert min_tok.status is RequestStatus.FINISHED_STOPPED and min_tok.num_output_tokens == 3
    assert_no_leaks(sched)


def test_abort_anywhere_frees_blocks() -> None:
    sched = make_scheduler(max_num_batched_tokens=4, chunk_size=4)
    running, waiting = make("running", 10), make("waiting", 10)
    sched.add_request(running)
    sched.add_request(waiting)
    out = sched.schedule()
    sched.abort("running")  # aborted while its step "executes"
    sched.update(out, fake_execute(out))
    assert running.status is RequestStatus.FINISHED_ABORTED
    sched.abort("waiting")
    sched.abort("unknown")
    assert_no_leaks(sched)


def test_prefix_cache_hit_skips_computed_tokens() -> None:
    sched = make_scheduler(block_size=4)
    a = make("a", 13, max_tokens=1)
    sched.add_request(a)
    run_to_completion(sched)
    b = make("b", 13, max_tokens=1)
    sched.add_request(b)
    out = sched.schedule()
    assert out.scheduled[0].num_new_tokens == 1 and b.num_cached_tokens == 12
    sched.update(out, fake_execute(out))
    assert_no_leaks(sched)


def test_prefill_role_holds_kv_until_release() -> None:
    sched = make_scheduler(role=Role.PREFILL, chunk_size=4)
    a = make("a", 9, max_tokens=50)
    sched.add_request(a)
    run_to_completion(sched)
    assert a.status is RequestStatus.FINISHED_PREFILLED and a.num_output_tokens == 1
    held_blocks = sched.block_manager.export("a")
    assert len(held_blocks) == 3 and sched.block_manager.stats().num_used_blocks == 3
    sched.release("a")
    assert_no_leaks(sched)
    # Aborting a held request also frees it.
    b = make("b", 5)
    sched.add_request(b)
    run_to_completion(sched)
    sched.abort("b")
    assert_no_leaks(sched)


def test_decode_role_admits_remote_kv_and_never_prefills_it() -> None:
    sched = make_scheduler(role=Role.DECODE)
    a = make("a", 9, max_tokens=3)
    blocks = sched.add_remote_request(a)
    assert blocks is not None and len(blocks) == 3  # 9 prompt tokens + the first token
    assert sched.schedule().is_empty  # nothing to do until the KV is in
    sched.finish_remote_kv("a", first_token_id=5)
    assert a.num_computed_tokens == 9 and a.output_token_ids == [5]
    steps = run_to_completion(sched)
    assert all(s.num_new_tokens == 1 for out in steps for s in out.scheduled)
    assert a.num_output_tokens == 3
    assert_no_leaks(sched)


def test_decode_role_abort_while_waiting_for_kv() -> None:
    sched = make_scheduler(role=Role.DECODE)
    a = make("a", 9)
    assert sched.add_remote_request(a) is not None
    sched.abort("a")
    assert_no_leaks(sched)


def test_decode_role_reserve_refused_when_full() -> None:
    sched = make_scheduler(role=Role.DECODE, num_blocks=2, block_size=4)
    assert sched.add_remote_request(make("big", 20)) is None
    assert "big" not in sched.requests
    assert_no_leaks(sched)


def test_hand_off_lifecycle_prefill_to_decode() -> None:
    """P computes, exports; D reserves, receives, decodes; both end with nothing used."""
    prefill = make_scheduler(role=Role.PREFILL, chunk_size=4)
    decode = make_scheduler(role=Role.DECODE)
    p_req = make("x", 10, max_tokens=4)
    d_req = make("x", 10, max_tokens=4)
    dst = decode.add_remote_request(d_req)
    prefill.add_request(p_req)
    run_to_completion(prefill)
    src = prefill.block_manager.export("x")
    assert dst is not None and len(src) <= len(dst)
    decode.finish_remote_kv("x", p_req.output_token_ids[0])
    prefill.release("x")
    run_to_completion(decode)
    assert d_req.num_output_tokens == 4
    assert_no_leaks(prefill)
    assert_no_leaks(decode)


def test_duplicate_request_id_rejected() -> None:
    sched = make_scheduler()
    sched.add_request(make("a", 3))
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(make("a", 3))


def test_decode_role_continues_a_migrated_request() -> None:
    """A request resumed with outputs so far: KV covers prompt + outputs, counting goes on."""
    sched = make_scheduler(role=Role.DECODE)
    a = Request("m", [10, 11, 12, 13, 14], SamplingParams(max_tokens=5), output_token_ids=[20, 21])
    blocks = sched.add_remote_request(a)
    assert blocks is not None and len(blocks) == 2  # 7 tokens so far + the next one, 4 per block
    sched.finish_remote_kv("m", first_token_id=22)
    assert a.num_computed_tokens == 7 and a.output_token_ids == [20, 21, 22]
    run_to_completion(sched)
    assert a.num_output_tokens == 5 and a.finish_reason == "length"
    assert_no_leaks(sched)


def test_decode_role_prefills_locally_as_a_fallback() -> None:
    sched = make_scheduler(role=Role.DECODE)
    a = make("a", 6, max_tokens=2)
    sched.add_request(a)
    run_to_completion(sched)
    assert a.num_output_tokens == 2
    assert_no_leaks(sched)


def test_without_chunking_a_long_prompt_is_not_starved_by_running_decodes() -> None:
    sched = make_scheduler(max_num_batched_tokens=8, enable_chunked_prefill=False)
    for i in range(3):
        sched.add_request(make(f"d{i}", 2, max_tokens=50))
    out = sched.schedule()
    sched.update(out, fake_execute(out))  # three requests now decoding
    sched.add_request(make("long", 20, max_tokens=1))
    sched.add_request(make("short", 3, max_tokens=1))
    out = sched.schedule()
    names = [(s.request.request_id, s.num_new_tokens) for s in out.scheduled]
    # The decodes go on and the long prompt runs whole beside them, as the step's only prompt.
    assert names == [("d0", 1), ("d1", 1), ("d2", 1), ("long", 20)]
    sched.update(out, fake_execute(out))
    out = sched.schedule()
    assert ("short", 3) in [(s.request.request_id, s.num_new_tokens) for s in out.scheduled]


def test_prefill_gate_holds_a_request_until_its_home_is_reserved() -> None:
    """A gated prompt is never computed before ``open_gate``; others run past it; waits are counted."""
    sched = make_scheduler(role=Role.PREFILL, chunk_size=8)
    gated, free = make("gated", 6), make("free", 6)
    sched.add_request(gated, gated=True)
    sched.add_request(free)
    first = sched.schedule()
    assert [s.request.request_id for s in first.scheduled] == ["free"]
    sched.update(first, fake_execute(first))
    assert gated.num_computed_tokens == 0 and sched.has_unfinished_requests()
    assert sched.num_gate_waits == 1  # the step had room for it
    idle = sched.schedule()
    assert idle.is_empty and sched.num_gate_waits == 1  # counted once per request
    assert sched.open_gate("gated") and not sched.open_gate("gated")
    run_to_completion(sched)
    assert gated.status is RequestStatus.FINISHED_PREFILLED


def test_prefill_gate_not_counted_when_the_step_is_full() -> None:
    sched = make_scheduler(role=Role.PREFILL, chunk_size=8, max_num_batched_tokens=8)
    sched.add_request(make("big", 20))
    sched.add_request(make("gated", 4), gated=True)
    out = sched.schedule()
    assert out.num_batched_tokens == 8 and sched.num_gate_waits == 0


def test_aborting_a_gated_request_frees_it() -> None:
    sched = make_scheduler(role=Role.PREFILL)
    sched.add_request(make("gated", 6), gated=True)
    assert sched.abort("gated") is not None
    assert not sched.gated and not sched.has_unfinished_requests()
    assert not sched.open_gate("gated")
    assert_no_leaks(sched)
