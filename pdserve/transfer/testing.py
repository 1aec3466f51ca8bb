"""Helpers for tests of anything that moves KV (transport tests, worker lifecycle tests).

Both ends can rebuild a sender's cache from a seed (:func:`random_cache`), so a
receiver in another process knows exactly what must arrive.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import torch

from pdserve.transfer.base import KVCaches, KVDescriptor, KVDone, KVLayout, KVReceiver, KVSender, make_sender


def random_cache(layout: KVLayout, num_blocks: int, seed: int) -> KVCaches:
    """A cache of ``layout``'s shape and dtype with ``num_blocks`` blocks of seeded random values."""
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, *layout.block_shape)
    return [
        tuple(torch.randn(shape, generator=g).to(layout.torch_dtype) for _ in range(2))  # type: ignore[misc]
        for _ in range(layout.num_layers)
    ]


def plan_requests(
    num_src_blocks: int, dst_pool: list[int], num_requests: int, seed: int
) -> list[dict[str, Any]]:
    """Requests with non-contiguous source and destination blocks (runs and gaps).

    Odd-numbered requests come in two chunks, even-numbered ones in one (so
    some finish while others still stream). Destinations are drawn without
    replacement from ``dst_pool``.
    """
    rng = random.Random(seed)
    pool = list(dst_pool)
    rng.shuffle(pool)
    requests = []
    for i in range(num_requests):
        n = rng.randint(3, 6)
        dst = sorted(pool[:n])  # a sorted sample of a shuffled pool: some runs, some gaps
        del pool[:n]
        src = rng.sample(range(num_src_blocks), n)
        cut = rng.randint(1, n - 1)
        chunks = [(0, cut), (cut, n)] if i % 2 else [(0, n)]
        requests.append({"id": f"req-{seed}-{i}", "src": src, "dst": dst, "chunks": chunks})
    return requests


def first_token_payload(request_id: str) -> bytes:
    return f"first-token-of-{request_id}".encode()


def run_plan(sender: KVSender, peer_id: str, requests: list[dict[str, Any]], num_layers: int,
             on_step: Callable[[], None] | None = None) -> None:
    """Interleave requests chunk by chunk, layer by layer; send each done right after its last chunk."""
    for c in range(max(len(r["chunks"]) for r in requests)):
        for layer in range(num_layers):
            for r in requests:
                if c < len(r["chunks"]):
                    lo, hi = r["chunks"][c]
                    sender.send_blocks(peer_id, r["id"], layer, r["src"][lo:hi], r["dst"][lo:hi])
                    if on_step is not None:
                        on_step()
        for r in requests:
            if c == len(r["chunks"]) - 1:
                sender.send_done(peer_id, r["id"], first_token_payload(r["id"]))


def assert_request_arrived(receiver: KVReceiver, src_cache: KVCaches, request: dict[str, Any]) -> None:
    for layer, (k, v) in enumerate(receiver.kv_caches):
        sk, sv = src_cache[layer]
        for s, d in zip(request["src"], request["dst"], strict=True):
            assert torch.equal(k[d], sk[s]), f"{request['id']} layer {layer}: K of block {d} differs"
            assert torch.equal(v[d], sv[s]), f"{request['id']} layer {layer}: V of block {d} differs"


def assert_untouched_zero(receiver: KVReceiver, touched: set[int]) -> None:
    untouched = [b for b in range(receiver.layout.num_blocks) if b not in touched]
    for layer, (k, v) in enumerate(receiver.kv_caches):
        assert not k[untouched].any() and not v[untouched].any(), f"layer {layer}: untouched block written"


def collect(receiver: KVReceiver, requests: list[dict[str, Any]], src_cache: KVCaches | None = None,
            timeout_s: float = 10.0) -> dict[str, KVDone]:
    """Poll until every request is reported; with ``src_cache``, check its data when its done shows up."""
    by_id = {r["id"]: r for r in requests}
    done: dict[str, KVDone] = {}
    deadline = time.monotonic() + timeout_s
    while len(done) < len(requests):
        assert time.monotonic() < deadline, f"only {sorted(done)} of {sorted(by_id)} reported"
        for d in receiver.poll(timeout_s=0.05):
            assert d.request_id in by_id and d.request_id not in done, f"unexpected report {d}"
            if src_cache is not None:  # done only after all data
                assert_request_arrived(receiver, src_cache, by_id[d.request_id])
            done[d.request_id] = d
    return done


def send_plan(descriptor: KVDescriptor, override: str | None, seed: int, num_src_blocks: int,
              requests: list[dict[str, Any]], peer_id: str) -> Any:
    """A whole sender's life: seeded cache, connect, push the plan, close; returns its stats."""
    cache = random_cache(descriptor.layout, num_src_blocks, seed)
    sender = make_sender(cache, override=override)
    try:
        sender.connect(peer_id, descriptor)
        run_plan(sender, peer_id, requests, descriptor.layout.num_layers)
        return sender.stats()
    finally:
        sender.close()


def sender_server(conn: Any) -> None:
    """Target of a spawned process: runs :func:`send_plan` for each argument tuple received, until None."""
    torch.set_num_threads(1)
    while (args := conn.recv()) is not None:
        try:
            conn.send(("ok", send_plan(*args)))
        except Exception as e:  # report and keep serving
            conn.send(("error", repr(e)))
