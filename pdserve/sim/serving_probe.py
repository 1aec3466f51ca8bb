"""The serving probe of ``pdserve profile``: a real deployment serves a few requests, and the overhead of
serving (:class:`~pdserve.sim.serving.ServingOverhead`) is derived from them (the method is
:mod:`pdserve.sim.serving`'s module doc).

:func:`serve` starts the deployment (``pdserve serve``'s launcher: router + 1 mixed worker, or router +
1 prefill + 1 decode worker with every request handed off), sends the probe's three parts and keeps the
workers' step logs; :func:`measure_serving` simulates the same requests and derives the figures, and
the co-location slowdown of the hand-off pair's served steps
(:func:`pdserve.sim.colocation.served_co_location`).
"""

from __future__ import annotations

import asyncio
import math
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from pdserve.bench.metrics import RequestRecord
from pdserve.config import Role, SchedulerConfig
from pdserve.sim.colocation import CoLocation, served_co_location
from pdserve.sim.link import LinkModel
from pdserve.sim.serving import (
    BATCH,
    FIRST_TOKEN_METHOD,
    LOADED_ESTIMATOR,
    LOADED_RATE,
    LOADED_REQUESTS,
    MIN_UNQUEUED,
    NUM_REQUESTS,
    OUTPUT_TOKENS,
    PROMPT_TOKENS,
    ServingOverhead,
    apply_serving,
    derive_loaded,
    derive_overhead,
    less_excess,
    prompt_step_excess,
    simulate_alone,
)
from pdserve.sim.spec import PoolSpec
from pdserve.sim.step_model import StepModel


@dataclass(frozen=True)
class ServedModel:
    """What :func:`measure_serving` needs to know of the profiled worker."""

    model: str
    worker_args: list[str]
    threads: int
    step_model: StepModel
    scheduler: SchedulerConfig
    block_size: int
    num_blocks: int
    max_model_len: int
    vocab_size: int
    num_layers: int = 1
    kv_bytes_per_token: int = 0


def absolute(record: RequestRecord, start_s: float) -> RequestRecord:
    """``record`` with ``sent_s`` on the host's ``time.perf_counter`` (its run started at ``start_s``), the
    clock of the workers' step logs."""
    return replace(record, sent_s=start_s + record.sent_s)


def serve(w: ServedModel, disaggregated: bool, step_log_dir: Path | None = None
          ) -> tuple[list[RequestRecord], list[RequestRecord], list[RequestRecord]]:
    """Through a real deployment (router + 1 mixed worker, or router + 1 prefill + 1 decode worker
    with every request handed off) started as ``pdserve serve`` starts one: requests of
    :data:`PROMPT_TOKENS` × :data:`OUTPUT_TOKENS` one at a time, then :data:`BATCH` sent together,
    then :data:`LOADED_REQUESTS` at Poisson arrivals; the ended requests' records of each part (the
    one-at-a-time and loaded ones with ``sent_s`` on ``time.perf_counter``, :func:`absolute`).
    With ``step_log_dir``, the workers log their steps there (``PDSERVE_STEP_LOG``)."""
    from pdserve.bench.arrivals import ArrivalConfig
    from pdserve.bench.client import ClientConfig
    from pdserve.bench.runner import LoadConfig, run_load
    from pdserve.bench.workload import WorkloadConfig, make_counter, make_workload
    from pdserve.launch.local import LaunchConfig, LocalLauncher
    from pdserve.worker.step_log import ENV as STEP_LOG_ENV

    router = ["--model", w.model, *(["--disagg-policy", "always"] if disaggregated else [])]
    launcher = LocalLauncher(LaunchConfig(
        mode="disaggregated" if disaggregated else "aggregated", num_prefill=1, num_decode=1, num_mixed=1,
        port=0, router_args=router, worker_args=["--model", w.model, *w.worker_args],
        threads_per_worker=w.threads, ready_timeout_s=300))
    counter = make_counter(w.model)
    records: list[RequestRecord] = []
    before = os.environ.get(STEP_LOG_ENV)
    try:
        if step_log_dir is not None:  # the workers inherit the environment at their start
            os.environ[STEP_LOG_ENV] = str(step_log_dir)
        launcher.start()
        client = ClientConfig(base_url=launcher.url, model=w.model, extra_body={"temperature": 0.0})
        for i, n in enumerate(PROMPT_TOKENS):
            workload = WorkloadConfig(kind="synthetic", input_len=str(n), output_len=str(OUTPUT_TOKENS),
                                      seed=i)
            load = LoadConfig(arrivals=ArrivalConfig(rate=math.inf),
                              num_requests=NUM_REQUESTS // len(PROMPT_TOKENS), max_concurrency=1,
                              warmup_requests=1, progress=False)
            run = asyncio.run(run_load(client, load, make_workload(workload, counter), None, counter))
            records += [absolute(r, run.start_s) for r in run.records
                        if not r.warmup and r.error_type is None]
        workload = WorkloadConfig(kind="synthetic", input_len=str(PROMPT_TOKENS[1]),
                                  output_len=str(OUTPUT_TOKENS), seed=len(PROMPT_TOKENS))
        load = LoadConfig(arrivals=ArrivalConfig(rate=math.inf), num_requests=BATCH, max_concurrency=BATCH,
                          progress=False)
        run = asyncio.run(run_load(client, load, make_workload(workload, counter), None, counter))
        batch = [r for r in run.records if r.error_type is None]
        spread = f"uniform:{PROMPT_TOKENS[0]}:{PROMPT_TOKENS[-1]}"
        workload = WorkloadConfig(kind="synthetic", input_len=spread, output_len=str(OUTPUT_TOKENS),
                                  seed=len(PROMPT_TOKENS) + 1)
        load = LoadConfig(arrivals=ArrivalConfig(rate=LOADED_RATE, seed=0), num_requests=LOADED_REQUESTS,
                          progress=False)
        run = asyncio.run(run_load(client, load, make_workload(workload, counter), None, counter))
        loaded = [absolute(r, run.start_s) for r in run.records if r.error_type is None]
    finally:
        launcher.stop()
        if before is None:
            os.environ.pop(STEP_LOG_ENV, None)
        else:
            os.environ[STEP_LOG_ENV] = before
    return records, batch, loaded


class ProbeResult(NamedTuple):
    """What the serving probe measured: the overheads (a mixed worker's; hand-offs', with a link) and the
    co-location slowdown of the hand-off pair's served steps (None: not measured, or too few steps)."""

    serving: ServingOverhead
    serving_handoff: ServingOverhead | None
    co_located_served: CoLocation | None


def measure_serving(w: ServedModel, link: LinkModel | None = None) -> ProbeResult:
    """The overhead of a mixed worker's own requests, and (with ``link``, the profiled KV link) that of
    hand-offs from a prefill worker to a decode worker, and that pair's served co-location
    (:func:`~pdserve.sim.colocation.served_co_location`); see the module doc."""
    from pdserve.worker.step_log import loop_gap, read_step_log

    lengths = "/".join(map(str, PROMPT_TOKENS))
    results: list[ServingOverhead] = []
    co_located = None
    for disagg in (False, True) if link is not None else (False,):
        with tempfile.TemporaryDirectory(prefix="pdserve-probe-steps-") as log_dir:
            records, batch, loaded = serve(w, disagg, Path(log_dir))
            logs = {p.stem: read_step_log(p) for p in Path(log_dir).glob("*.jsonl")}
        decoding = logs.get("decode-0" if disagg else "mixed-0")  # the worker whose loop streams tokens
        gap = loop_gap(decoding) if decoding else None
        # the worker that computed the prompts: each TTFT less what its prompt steps ran over the model
        prompting = logs.get("prefill-0" if disagg else "mixed-0")
        corrected, corrected_loaded = records, loaded
        if prompting:
            corrected = less_excess(records, prompt_step_excess(records, prompting, w.step_model))
            corrected_loaded = less_excess(loaded, prompt_step_excess(loaded, prompting, w.step_model))
        if disagg and "prefill-0" in logs and decoding:
            co_located = served_co_location(logs["prefill-0"], decoding, w.step_model, w.threads)

        def pools_of(step: StepModel, disagg: bool = disagg) -> tuple[PoolSpec, ...]:
            return ((PoolSpec(Role.PREFILL, 1, step, w.num_blocks, link=link),
                     PoolSpec(Role.DECODE, 1, step, w.num_blocks)) if disagg
                    else (PoolSpec(Role.MIXED, 1, step, w.num_blocks),))

        rest = (w.scheduler, w.block_size, w.max_model_len, w.vocab_size, w.num_layers, w.kv_bytes_per_token)
        simulated = simulate_alone(records, pools_of(w.step_model), *rest)
        simulated_batch = simulate_alone(batch, pools_of(w.step_model), *rest, together=True)
        shape = "1 prefill + 1 decode worker, every request handed off" if disagg else "1 mixed worker"
        method = (f"{len(records)} requests ({lengths} prompt tokens, {OUTPUT_TOKENS} out) one at a time, "
                  f"then {len(batch)} together ({PROMPT_TOKENS[1]} prompt tokens), through a router + "
                  f"{shape} "
                  f"(× {w.threads} threads) on this machine, minus the same requests simulated with the "
                  f"fitted step model; medians")
        if gap is not None:
            method += (f"; per token and per further row: the served worker loop's median gap between busy "
                       f"steps ({gap.num_gaps} gaps in its step log)")
        idle = derive_overhead(corrected, simulated, method, batch, simulated_batch, len(batch), gap)
        if prompting:
            raw = derive_overhead(records, simulated, method, batch, simulated_batch, len(batch), gap)
            idle = replace(idle, first_token_method=FIRST_TOKEN_METHOD, probe_first_token_s=raw.first_token_s)
            method += ("; TTFTs less the time the served prompt steps (the worker's step log) ran over the "
                       "step model")
        # the loaded requests, simulated at their send times with the figures just derived
        simulated_loaded = simulate_alone(loaded, pools_of(apply_serving(w.step_model, idle)), *rest,
                                          at_sent=True, request_overhead_s=idle.first_token_s)
        extra, used = derive_loaded(corrected_loaded, simulated_loaded) if loaded else (None, 0)
        total = None if extra is None else idle.first_token_s + extra
        results.append(replace(idle, first_token_loaded_s=total, loaded_estimator=LOADED_ESTIMATOR,
                               num_requests=idle.num_requests + len(loaded),
                               method=f"{method}; then {len(loaded)} at Poisson arrivals ({LOADED_RATE:g}/s, "
                                      f"prompts {PROMPT_TOKENS[0]}-{PROMPT_TOKENS[-1]}), simulated at their "
                                      f"send times with the figures above; the loaded figure from the "
                                      f"{used} of them that found no other request before its first token "
                                      f"(served and simulated; at least {MIN_UNQUEUED}, else none)"))
    return ProbeResult(results[0], results[1] if len(results) > 1 else None, co_located)
