"""S5's fake worker: a ``mixed`` worker process that streams tokens on each prompt's schedule.

Lifecycle of :func:`fake_worker` (run as ``s5_router_overhead.py fake-worker``):

1. Register with the router over ZeroMQ (an empty prefix cache: the router still hashes
   and looks up every prompt, as with real workers).
2. For each ``PrefillRequest``, read the schedule (``[fake ttft_ms=… itl_ms=… tag=…]``) from
   the prompt's byte-level token ids and queue one ``Tokens`` message per token at absolute
   deadlines; answer stats, snapshot and re-register requests; heartbeat every 0.5 s.
3. Stop on ``Shutdown``. With a trace file, log when each request arrived and its first
   token left (``time.monotonic``).
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import time

from pdserve.bench.fake_server import Schedule, parse_directive, with_overrides

MODEL = "tiny"
BYTE_OFFSET = 3  # the presets' byte tokenizer: token id = byte + 3
TOKEN_ID = ord("a") + BYTE_OFFSET


def fake_worker(router: str, worker_id: str, trace_path: str | None) -> None:
    """Register with the router as a mixed worker and stream tokens on each prompt's schedule.

    With ``trace_path``, append ``tag received_s first_token_sent_s`` (``time.monotonic``) per request.
    """
    trace = open(trace_path, "a", buffering=1 << 16) if trace_path else None  # noqa: SIM115
    import zmq

    from pdserve.block_hash import HASH_SCHEME
    from pdserve.worker import protocol as p

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, worker_id.encode())
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(router)

    def send(message: p.Message) -> None:
        sock.send(p.encode(message), copy=False)

    def register() -> None:
        # It has a (never changing, empty) prefix cache: the router hashes every prompt and looks
        # it up in its cache index as with real workers, so that cost is part of what is measured.
        send(p.Register(worker_id, "mixed", MODEL, os.getpid(), "fake-host", 4096, 16, 1 << 20,
                        hash_scheme=HASH_SCHEME, kv_epoch=1))

    # request id → (tokens asked for, prompt length, tag, received_s);
    # the tokens to send: a heap of (due_s, seq, request id, token index)
    requests: dict[str, tuple[int, int, str, float]] = {}
    due: list[tuple[float, int, str, int]] = []
    seq = itertools.count()
    next_heartbeat_s = 0.0
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    register()
    while True:
        now = time.monotonic()
        wait_s = min(next_heartbeat_s, due[0][0] if due else math.inf) - now
        if poller.poll(max(0, math.ceil(wait_s * 1e3))):
            while True:
                try:
                    data = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                m = p.decode(data)
                if isinstance(m, p.PrefillRequest):
                    start_s = time.monotonic()
                    prompt = bytes(t - BYTE_OFFSET for t in m.prompt_token_ids[:80] if t >= BYTE_OFFSET)
                    directive = parse_directive(prompt.decode("utf-8", "replace"))
                    sched = with_overrides(Schedule(), directive)
                    tag = directive.get("tag", "-")
                    requests[m.request_id] = (m.params.max_tokens, len(m.prompt_token_ids), tag, start_s)
                    for i in range(m.params.max_tokens):
                        due_s = start_s + (sched.ttft_ms + i * sched.itl_ms) / 1e3
                        heapq.heappush(due, (due_s, next(seq), m.request_id, i))
                elif isinstance(m, p.Abort):
                    requests.pop(m.request_id, None)
                elif isinstance(m, p.GetStats):
                    send(p.WorkerStats(worker_id, "mixed", p.WorkerLoad(num_running=len(requests)), 0, 0))
                elif isinstance(m, p.Reregister):
                    register()
                elif isinstance(m, p.KVSnapshotRequest):
                    send(p.KVSnapshot(worker_id, 1, 0, []))
                elif isinstance(m, p.Shutdown):
                    if trace is not None:
                        trace.close()
                    return
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, _, rid, i = heapq.heappop(due)
            if rid not in requests:
                continue  # aborted
            num_tokens, num_prompt, tag, received_s = requests[rid]
            last = i == num_tokens - 1
            if last:
                del requests[rid]
            send(p.Tokens(rid, i, [TOKEN_ID], finished=last, finish_reason="length" if last else None,
                          num_prompt_tokens=num_prompt))  # fmt: skip
            if i == 0 and trace is not None:
                trace.write(f"{tag} {received_s:.6f} {time.monotonic():.6f}\n")
        if now >= next_heartbeat_s:
            if trace is not None:
                trace.flush()
            send(p.Heartbeat(worker_id, p.WorkerLoad(num_running=len(requests)), kv_epoch=1, kv_seq=0))
            next_heartbeat_s = now + 0.5
