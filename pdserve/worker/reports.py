"""What a worker tells the router about itself and its requests, built from engine state.

* :func:`worker_load`: the load a heartbeat carries (queues, free blocks, busy time);
* :func:`worker_stats`: the counters ``GetStats`` asks for (tests, metrics, ``pdserve status``);
* :func:`tokens_message`: a request's new tokens (and logprobs, timing) as a ``Tokens`` message.

Pure functions of what they are given: the :class:`~pdserve.worker.worker.Worker` sends
what they build.
"""

from __future__ import annotations

import torch

from pdserve.engine.engine import LLMEngine, RequestOutput
from pdserve.request import TokenLogprobs
from pdserve.transfer.base import KVReceiver, KVSender, TransferStats
from pdserve.worker import protocol as p
from pdserve.worker.decode import KVIntake
from pdserve.worker.kv_events import KVEventPublisher


def wire_logprobs(lps: list[TokenLogprobs]) -> list[tuple[int, float, dict[int, float]]]:
    """Log-probabilities in their wire form."""
    return [(lp.token_id, lp.logprob, lp.top) for lp in lps]


def worker_load(engine: LLMEngine, intake: KVIntake | None) -> p.WorkerLoad:
    """Current load, as heartbeats report it."""
    sched, stats = engine.scheduler, engine.block_manager.stats()
    return p.WorkerLoad(
        num_running=len(sched.running),
        num_waiting=len(sched.waiting) + (intake.num_pending if intake else 0),
        num_waiting_for_kv=len(sched.waiting_for_kv),
        num_held=len(sched.held),
        num_free_blocks=stats.num_free_blocks,
        num_total_blocks=stats.num_blocks,
        num_cached_blocks=stats.num_cached_blocks,
        num_prefill_tokens=engine.num_prompt_tokens_computed,
        prefill_busy_s=engine.prefill_busy_s,
        num_prefill_steps=engine.num_prefill_steps,
        num_decode_steps=engine.num_decode_steps,
        decode_busy_s=engine.decode_busy_s,
        num_decode_seqs=engine.num_decode_seqs,
        prefix_query_tokens=stats.prefix_query_tokens,
        prefix_hit_tokens=stats.prefix_hit_tokens,
        num_deferred_reservations=intake.num_deferred if intake else 0,
        num_gate_waits=sched.num_gate_waits,
        num_prefix_waits=sched.num_prefix_waits,
        threads=torch.get_num_threads(),
    )


def worker_stats(
    worker_id: str,
    role: str,
    load: p.WorkerLoad,
    engine: LLMEngine,
    sender: KVSender | None,
    receiver: KVReceiver | None,
    intake: KVIntake | None,
    kv_events: KVEventPublisher,
) -> p.WorkerStats:
    """Counters for tests, metrics and ``pdserve status``."""
    sent = sender.stats() if sender is not None else None
    return p.WorkerStats(
        worker_id=worker_id,
        role=role,
        load=load,
        num_prompt_tokens_computed=engine.num_prompt_tokens_computed,
        num_steps=engine.num_steps,
        kv_bytes_sent=sent.num_bytes if sent is not None else 0,
        kv_bytes_received=intake.num_bytes_received if intake else 0,
        kv_transfers=(sent.num_transfers if sent is not None else 0)
        + (intake.num_transfers if intake else 0),
        transports=sorted(transports(sent, receiver)),
        kv_events=kv_events.num_events,
        kv_event_batches=kv_events.num_batches,
        kv_event_bytes=kv_events.num_bytes,
        kv_event_cpu_s=kv_events.cpu_s,
        kv_snapshots=kv_events.num_snapshots,
    )


def transports(sent: TransferStats | None, receiver: KVReceiver | None) -> set[str]:
    """The transports a worker sends KV over, and the one it receives KV by."""
    names = set(sent.transports) if sent is not None else set()
    if receiver is not None:
        names.add(receiver.descriptor().transport)
    return names


def tokens_message(
    out: RequestOutput, finished: bool | None = None, timing: p.PrefillTiming | None = None
) -> p.Tokens:
    """The ``Tokens`` message of a step's output: its new tokens; ``finished`` overrides the output's."""
    new = out.new_token_ids
    start = len(out.token_ids) - len(new)
    logprobs = wire_logprobs(out.logprobs[start:]) if out.logprobs else None
    done = out.finished if finished is None else finished
    return p.Tokens(
        request_id=out.request_id,
        start=start,
        token_ids=list(new),
        logprobs=logprobs,
        finished=done,
        finish_reason=out.finish_reason if done else None,
        stop_reason=out.stop_reason if done else None,
        num_prompt_tokens=len(out.prompt_token_ids),
        num_cached_tokens=out.num_cached_tokens,
        timing=timing,
    )
