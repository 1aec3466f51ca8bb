"""The simulator steps the real scheduler exactly as the real engine does (same batches, same preemptions)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pdserve.config import CacheConfig, EngineConfig, ModelConfig, Role, SchedulerConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.sampling_params import SamplingParams
from pdserve.sim.link import LinkModel
from pdserve.sim.simulator import PoolSpec, SimConfig, SimRequest, Simulator
from pdserve.sim.step_model import LinearStepModel

# prompt lengths and max_tokens: long enough to need chunks, many enough to run out of blocks
WORKLOAD = [(37, 9), (5, 14), (60, 3), (22, 11), (9, 20), (41, 6), (3, 8)]
SCHED = SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=5, chunk_size=16)
NUM_BLOCKS, BLOCK_SIZE = 18, 4
STEP = LinearStepModel((1e-3, 1e-5, 0.0, 1e-7, 1e-5))


def prompt(i: int, n: int) -> list[int]:
    return [(7 * i + 3 * k) % 250 + 3 for k in range(n)]


class Recorder:
    def __init__(self) -> None:
        self.steps: list[tuple[tuple[tuple[str, int], ...], tuple[str, ...]]] = []

    def on_schedule(self, out: SchedulerOutput) -> None:
        batch = tuple((s.request.request_id, s.num_new_tokens) for s in out.scheduled)
        self.steps.append((batch, tuple(out.preempted_ids)))

    def on_layer_done(self, layer: int) -> None:
        pass


def real_engine_steps() -> tuple[list[tuple[tuple[tuple[str, int], ...], tuple[str, ...]]], int]:
    config = EngineConfig(
        model=ModelConfig(model="tiny", device="cpu"),
        cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS, enable_prefix_caching=True),
        scheduler=SCHED,
    )
    engine = LLMEngine(config, detokenize=False)
    for i, (n_in, n_out) in enumerate(WORKLOAD):
        engine.add_request(prompt(i, n_in), SamplingParams(max_tokens=n_out, ignore_eos=True), f"sim-{i}")
    rec = Recorder()
    while engine.has_unfinished_requests():
        engine.step(hooks=rec)
    assert engine.block_manager.stats().num_used_blocks == 0
    return rec.steps, engine.scheduler.num_preemptions


def sim_config(pools: tuple[PoolSpec, ...]) -> SimConfig:
    return SimConfig(pools=pools, scheduler=SCHED, block_size=BLOCK_SIZE, max_model_len=4096,
                     num_layers=4, kv_bytes_per_token=1024)


def test_simulator_reproduces_the_real_engine_step_sequence() -> None:
    real_steps, real_preemptions = real_engine_steps()
    assert real_preemptions > 0, "the workload must exercise preemption"
    sim = Simulator(sim_config((PoolSpec(Role.MIXED, 1, STEP, NUM_BLOCKS),)), record_steps=True)
    requests = [SimRequest(0.0, tuple(prompt(i, n_in)), n_out) for i, (n_in, n_out) in enumerate(WORKLOAD)]
    result = sim.run(requests)
    assert result.steps is not None
    sim_steps = [(s.batch, s.preempted_ids) for s in result.steps if s.batch]
    assert sim_steps == real_steps
    assert result.num_preemptions == real_preemptions
    assert [r.num_output_tokens for r in result.records] == [n_out for _, n_out in WORKLOAD]
    assert all(r.ok for r in result.records)


def disagg(num_prefill: int = 1, num_decode: int = 2, decode_blocks: int = 40,
           disagg_policy: str = "auto") -> SimConfig:
    link = LinkModel(1e8, 1e-4)
    return replace(sim_config((
        PoolSpec(Role.PREFILL, num_prefill, STEP, 64, link=link),
        PoolSpec(Role.DECODE, num_decode, STEP, decode_blocks),
    )), disagg_policy=disagg_policy)


@pytest.mark.parametrize("disagg_policy", ["auto", "always"])
@pytest.mark.parametrize("decode_blocks", [40, 17])
def test_disaggregated_run_finishes_everything_and_frees_all_blocks(decode_blocks: int, disagg_policy: str
                                                                    ) -> None:
    sim = Simulator(disagg(decode_blocks=decode_blocks, disagg_policy=disagg_policy))
    requests = [SimRequest(0.01 * i, tuple(prompt(i, n)), m) for i, (n, m) in enumerate(WORKLOAD)]
    result = sim.run(requests)
    assert all(r.ok for r in result.records)
    assert [r.num_output_tokens for r in result.records] == [n for _, n in WORKLOAD]
    for workers in sim.workers.values():
        for w in workers:
            assert w.block_manager.stats().num_used_blocks == 0, w.worker_id
            assert not w.scheduler.held and not w.scheduler.has_unfinished_requests()
            info = sim.router.info(w.worker_id)  # the router's account: nothing in flight, nothing queued
            assert info.num_inflight == 0 and info.perf.queued_prefill_tokens == 0
    # TTFT includes the prefill; tokens come in order
    for r in result.records:
        assert r.ttft_s is not None and r.ttft_s > 0
        assert r.chunk_s == sorted(r.chunk_s)


def test_kv_transfer_delays_decode_but_not_the_first_token() -> None:
    # every prompt remote (``always``): with ``auto`` this 40-token prompt is computed on D (no transfer)
    slow = replace(disagg(disagg_policy="always"), pools=(
        PoolSpec(Role.PREFILL, 1, STEP, 64, link=LinkModel(1e4, 0.0)),  # 10 kB/s: a crawl
        PoolSpec(Role.DECODE, 1, STEP, 64),
    ))
    requests = [SimRequest(0.0, tuple(prompt(0, 40)), 4)]
    fast_rec = Simulator(disagg(disagg_policy="always")).run(requests).records[0]
    slow_rec = Simulator(slow).run(requests).records[0]
    assert slow_rec.ttft_s == pytest.approx(fast_rec.ttft_s)
    # 40 tokens × 1 kB over 10 kB/s: the second token waits ~4 s for the KV
    assert slow_rec.chunk_s[1] - slow_rec.chunk_s[0] > 3.0 > fast_rec.chunk_s[1] - fast_rec.chunk_s[0]


def test_a_request_that_can_never_get_decode_blocks_is_reported_not_lost() -> None:
    # remote prefill: D must reserve the whole prompt (computed on D it would never fit either)
    sim = Simulator(disagg(decode_blocks=8, disagg_policy="always"))
    result = sim.run([SimRequest(0.0, tuple(prompt(0, 60)), 2), SimRequest(0.0, tuple(prompt(1, 4)), 2)])
    bad, good = result.records
    assert bad.error_type == "sim_stalled" and not bad.ok
    assert good.ok and good.num_output_tokens == 2
