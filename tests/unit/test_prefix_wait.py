"""A waiting request whose prefix a running one is computing waits for it (engine/prefix_wait.py)."""

from __future__ import annotations

from test_scheduler import assert_no_leaks, fake_execute

from pdserve.config import SchedulerConfig
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.scheduler import Scheduler
from pdserve.request import Request
from pdserve.sampling_params import SamplingParams

PREFIX = list(range(100, 356))  # 256 tokens: 16 blocks of 16


def make(rid: str, tail: int, prefix: list[int] = PREFIX) -> Request:
    tokens = prefix + [1000 + 500 * ord(rid[0]) + i for i in range(tail)]  # each its own tail
    return Request(rid, tokens, SamplingParams(max_tokens=2), eos_token_ids=(0,))


def scheduler(chunk: int = 64) -> Scheduler:
    config = SchedulerConfig(max_num_batched_tokens=512, chunk_size=chunk)
    return Scheduler(config, BlockManager(256, 16), max_model_len=2048)


def prompt_tokens_computed(sched: Scheduler, rid: str, steps: int = 200) -> tuple[int, int]:
    """Run to completion; (prompt tokens ``rid`` computed, its cached tokens at admission)."""
    computed = 0
    request = sched.requests[rid]
    for _ in range(steps):
        if not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        computed += sum(s.num_new_tokens for s in out.scheduled if s.request.request_id == rid and
                        s.num_computed_tokens < s.request.num_prompt_tokens)
        sched.update(out, fake_execute(out))
    assert not sched.has_unfinished_requests()
    return computed, request.num_cached_tokens


def test_a_second_request_waits_for_the_prefix_the_first_is_computing() -> None:
    sched = scheduler()
    a, b = make("a", 20), make("b", 30)
    sched.add_request(a)
    sched.update(out := sched.schedule(), fake_execute(out))  # a computed its first chunk
    sched.add_request(b)
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["a"]  # b waits for blocks 4..15
    sched.update(out, fake_execute(out))
    computed, cached = prompt_tokens_computed(sched, "b")
    assert sched.num_prefix_waits == 1  # one request waited (for three steps)
    assert cached == len(PREFIX)  # the whole shared prefix came from the cache...
    assert computed == 30  # ...and b computed only its own tail
    assert_no_leaks(sched)


def test_arriving_together_the_second_waits_for_the_first() -> None:
    sched = scheduler()
    sched.add_request(make("a", 20))
    sched.add_request(make("b", 30))
    computed, cached = prompt_tokens_computed(sched, "b")
    assert (computed, cached) == (30, len(PREFIX))


def test_a_short_shared_prefix_is_computed_again_rather_than_waited_for() -> None:
    sched = scheduler()
    one_block = PREFIX[:16]
    sched.add_request(make("a", 200, one_block))
    sched.add_request(b := make("b", 40, one_block))
    out = sched.schedule()
    assert {s.request.request_id for s in out.scheduled} == {"a", "b"}  # waiting would cost b a step
    assert sched.num_prefix_waits == 0
    assert b.num_cached_tokens == 0


def test_without_a_prefix_cache_nobody_waits() -> None:
    config = SchedulerConfig(max_num_batched_tokens=512, chunk_size=64)
    sched = Scheduler(config, BlockManager(256, 16, enable_prefix_caching=False), max_model_len=2048)
    sched.add_request(make("a", 20))
    sched.add_request(make("b", 30))
    out = sched.schedule()
    assert {s.request.request_id for s in out.scheduled} == {"a", "b"}
