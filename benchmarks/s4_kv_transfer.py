"""S4 — KV transfer: bytes/s and per-request latency of ``shm`` and ``tcp`` against the machine's limits.

KV of 256, 2048 and 8192 tokens of the ``bench-50m`` shape (8 layers, 4 KV
heads, head_dim 64, fp32, 16-token blocks) moves layer by layer from a sender
process (this one, P) into a receiver process (spawned, D): per request, 8 ×
``send_blocks`` (K and V of all its blocks) and one ``send_done``; the latency
is from P's first ``send_blocks`` to D's ``poll()`` returning the done notice
(one monotonic clock: same host). Limits measured in the same run, on the same
bytes: a plain memory copy of the sender's layers into a private cache (torch
``copy_`` and numpy ``copyto``) for ``shm``; a raw loopback TCP socket
(``sendall`` of each layer's K and V / ``recv_into`` a preallocated buffer in a
spawned process; the faster of kernel-tuned and 4 MiB socket buffers) for
``tcp``. Systems run interleaved, one request each per round, each from cold
caches. Block ids are a run on both sides (``contiguous``, what a fresh
block manager hands out) and, with
``--scattered``, random permutations as well (worst case).

Phase ``overlap`` (``s4_overlap.py``): the fraction of the transfer hidden
behind prefill compute by layer-wise streaming, for a 2048-token prompt
prefilled by a real prefill engine, chunk size 512 and 2048.

    python benchmarks/s4_kv_transfer.py [--tokens 256 2048 8192] [--reps 9] [--scattered]
        [--phases transfer overlap] [--overlap-reps 3] [--overlap-chunks 512 2048]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch
import zmq
from s4_overlap import print_overlap, run_overlap

from pdserve.transfer import KVLayout, make_receiver, make_sender
from pdserve.transfer.wire import SOCKET_BUFFER_BYTES

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 8, 4, 64, 16, "float32"  # bench-50m
TARGET_RATIO = 0.5
CACHE_BYTES = 32 << 20  # this machine's L3; evicted before every measurement
RESULTS = Path(__file__).parent / "results" / "s4_kv_transfer.json"


def bench_layout(num_blocks: int) -> KVLayout:
    return KVLayout(NUM_LAYERS, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, DTYPE)


# ----------------------------------------------------------------------------- child processes


def receiver_main(transport: str, layout: KVLayout, conn: Any) -> None:
    """D: a receiver that reports every done notice as (monotonic time seen, num_bytes, transfer_s, error)."""
    torch.set_num_threads(1)
    receiver = make_receiver(transport, layout)
    conn.send(receiver.descriptor())
    while True:
        for d in receiver.poll(timeout_s=0.01):  # blocks (no spinning) until a done notice arrives
            conn.send((time.monotonic(), d.num_bytes, d.transfer_s, d.error))
        if conn.poll():
            cmd = conn.recv()
            if cmd[0] == "stop":
                break
            _, layer, block_ids = cmd  # checksums of blocks, to check the data arrived
            k, v = receiver.kv_caches[layer]
            idx = torch.tensor(block_ids)
            conn.send((k[idx].double().sum().item(), v[idx].double().sum().item()))
    receiver.close()


def raw_socket_main(num_bytes: int, buffer_bytes: int | None, conn: Any) -> None:
    """Raw loopback TCP receiver: ``recv_into`` a preallocated buffer; reports when each request completed."""
    srv = socket.socket()
    if buffer_bytes:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)  # inherited by the accepted socket
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    conn.send(srv.getsockname()[1])
    sock, _ = srv.accept()
    buf = memoryview(np.ones(num_bytes, dtype=np.uint8))  # type: ignore[arg-type]  # ones: pre-faulted
    while True:
        got = 0
        while got < num_bytes:
            n = sock.recv_into(buf[got:])
            if n == 0:
                return
            got += n
        conn.send(time.monotonic())


def median_and_spread(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1]}


def spawn(target: Any, *args: Any) -> tuple[Any, Any]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, child), daemon=True)
    proc.start()
    return proc, parent


def stop(proc: Any) -> None:
    proc.join(timeout=10)
    if proc.is_alive():
        proc.kill()


# ----------------------------------------------------------------------------- one measurement each
# Each returns seconds for one request; they run interleaved, round by round, so that drift of
# this shared machine hits the limits and the transports alike.

Layers = list[tuple[torch.Tensor, torch.Tensor]]


class Memcpy:
    """Plain copies of the same bytes (each layer's K and V run) into a private, pre-faulted cache."""

    def __init__(self, src: Layers, num_blocks: int) -> None:
        self.n = num_blocks
        self.src = src
        self.dst = [(torch.ones_like(k), torch.ones_like(v)) for k, v in src]
        self.src_np = [(k.numpy(), v.numpy()) for k, v in src]
        self.dst_np = [(k.numpy(), v.numpy()) for k, v in self.dst]

    def torch(self) -> float:
        n, t0 = self.n, time.perf_counter()
        for (sk, sv), (dk, dv) in zip(self.src, self.dst, strict=True):
            dk[:n].copy_(sk[:n])
            dv[:n].copy_(sv[:n])
        return time.perf_counter() - t0

    def numpy(self) -> float:
        n, t0 = self.n, time.perf_counter()
        for (sk, sv), (dk, dv) in zip(self.src_np, self.dst_np, strict=True):
            np.copyto(dk[:n], sk[:n])
            np.copyto(dv[:n], sv[:n])
        return time.perf_counter() - t0


class RawSocket:
    """sendall of each layer's K and V to a spawned process that recv_into's a preallocated buffer.

    ``buffer_bytes``: SO_SNDBUF/SO_RCVBUF as the KV links set them, or None for the kernel's autotuning.
    """

    def __init__(self, src: Layers, num_blocks: int, buffer_bytes: int | None) -> None:
        num_bytes = sum(2 * k[:num_blocks].numel() * k.element_size() for k, _ in src)
        self.proc, self.conn = spawn(raw_socket_main, num_bytes, buffer_bytes)
        self.sock = socket.socket()
        if buffer_bytes:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
        self.sock.connect(("127.0.0.1", self.conn.recv()))
        self.views = [
            tuple(memoryview(t[:num_blocks].numpy()).cast("B") for t in kv)  # type: ignore[arg-type]
            for kv in src
        ]

    def __call__(self) -> float:
        t0 = time.monotonic()
        for k, v in self.views:
            self.sock.sendall(k)
            self.sock.sendall(v)
        return float(self.conn.recv()) - t0

    def close(self) -> None:
        self.sock.close()
        stop(self.proc)


class Transport:
    """A spawned receiver and a sender here; one request = 8 layers of send_blocks + send_done."""

    def __init__(
        self, transport: str, src: Layers, layout: KVLayout, num_blocks: int, scattered: bool
    ) -> None:
        self.proc, self.conn = spawn(receiver_main, transport, layout)
        self.sender = make_sender(src, override=transport)
        self.sender.connect("d", self.conn.recv())
        rng = np.random.default_rng(0)
        if scattered:
            self.src_ids = rng.permutation(layout.num_blocks)[:num_blocks].tolist()
            self.dst_ids = rng.permutation(layout.num_blocks)[:num_blocks].tolist()
        else:  # one run on each side, not the same run
            self.src_ids = list(range(num_blocks))
            self.dst_ids = list(range(layout.num_blocks - num_blocks, layout.num_blocks))
        self.src = src
        self.expected_bytes = 2 * NUM_LAYERS * num_blocks * layout.block_bytes
        self.count = 0
        self.send_s: list[float] = []  # until the last send_blocks returned (shm: data in place)
        self.receiver_transfer_s: list[float] = []

    def request(self, num_layers: int = NUM_LAYERS) -> float:
        rid = f"r{self.count}"
        self.count += 1
        t0 = time.monotonic()
        for layer in range(num_layers):
            self.sender.send_blocks("d", rid, layer, self.src_ids, self.dst_ids)
        t_sent = time.monotonic()
        self.sender.send_done("d", rid, b"")
        seen_s, num_bytes, transfer_s, error = self.conn.recv()
        expected = self.expected_bytes * num_layers // NUM_LAYERS
        assert error is None and num_bytes == expected, (error, num_bytes, expected)
        if num_layers:
            self.send_s.append(t_sent - t0)
            self.receiver_transfer_s.append(transfer_s)
        return float(seen_s) - t0

    def empty_request(self) -> float:
        """Only a done notice: the floor of any request's latency."""
        return self.request(num_layers=0)

    def check_and_close(self) -> None:
        try:
            layer = NUM_LAYERS - 1
            self.conn.send(("check", layer, self.dst_ids))
            k_sum, v_sum = self.conn.recv()
            idx = torch.tensor(self.src_ids)
            k, v = self.src[layer]
            for got, want in ((k_sum, k[idx].double().sum().item()), (v_sum, v[idx].double().sum().item())):
                assert abs(got - want) <= 1e-6 * max(1.0, abs(want)), f"data mismatch: {got} != {want}"
        finally:
            self.sender.close()
            self.conn.send(("stop",))
            stop(self.proc)


def run_size(tokens: int, src: Layers, layout: KVLayout, transports: list[str], scattered: bool,
             reps: int, warmup: int) -> dict[str, list[float]]:
    """All systems for one prompt size, interleaved round by round; seconds per request by system name."""
    num_blocks = -(-tokens // BLOCK_SIZE)
    memcpy = Memcpy(src, num_blocks)
    raws = [RawSocket(src, num_blocks, None), RawSocket(src, num_blocks, SOCKET_BUFFER_BYTES)]
    systems: dict[str, Any] = {"memcpy_torch": memcpy.torch, "memcpy_numpy": memcpy.numpy,
                               "raw_socket": raws[0], "raw_socket_4MiB": raws[1]}
    links: dict[str, Transport] = {}
    for transport in transports:
        for ids in ["contiguous", "scattered"] if scattered else ["contiguous"]:
            link = Transport(transport, src, layout, num_blocks, ids == "scattered")
            links[f"{transport}/{ids}"] = link
            systems[f"{transport}/{ids}"] = link.request
        systems[f"{transport}/notice-only"] = links[f"{transport}/contiguous"].empty_request
    times: dict[str, list[float]] = {name: [] for name in systems}
    evict = np.zeros(2 * CACHE_BYTES // 8)  # float64
    try:
        for round_ in range(warmup + reps):
            for name, fn in systems.items():
                evict += 1.0  # every system starts from cold caches (the 256-token case fits in L3)
                t = fn()
                if round_ >= warmup:
                    times[name].append(t)
        for name, link in links.items():
            times[f"{name}:send"] = link.send_s[-reps:]
            times[f"{name}:receiver"] = link.receiver_transfer_s[-reps:]
    finally:
        for raw in raws:
            raw.close()
        for link in links.values():
            link.check_and_close()
    return times


# ----------------------------------------------------------------------------- report


def machine_info() -> dict[str, Any]:
    """The shared description (:func:`common.machine_info`) and what this scenario depends on."""
    return {
        **common.machine_info(),
        "torch_threads": torch.get_num_threads(), "numpy": np.__version__, "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 2048, 8192])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--transports", nargs="+", default=["shm", "tcp"], choices=["shm", "tcp"])
    ap.add_argument("--scattered", action="store_true", help="also run with randomly permuted block ids")
    ap.add_argument("--phases", nargs="+", default=["transfer", "overlap"], choices=["transfer", "overlap"])
    ap.add_argument("--overlap-tokens", type=int, default=2048)
    ap.add_argument("--overlap-chunks", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--overlap-reps", type=int, default=3)
    ap.add_argument("--overlap-warmup", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(1)  # P and D share this machine's cores: one thread each (MACHINE.md)

    max_blocks = -(-max(args.tokens) // BLOCK_SIZE)
    layout = bench_layout(2 * max_blocks)  # room for disjoint runs and for scattering
    gen = torch.Generator().manual_seed(0)
    shape = (layout.num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    src = [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) for _ in range(NUM_LAYERS)]

    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for tokens in args.tokens if "transfer" in args.phases else []:
        num_bytes = 2 * NUM_LAYERS * -(-tokens // BLOCK_SIZE) * layout.block_bytes
        times = run_size(tokens, src, layout, args.transports, args.scattered, args.reps, args.warmup)
        med = {name: statistics.median(xs) for name, xs in times.items()}
        best_memcpy = min(med["memcpy_torch"], med["memcpy_numpy"])
        best_raw = min(med["raw_socket"], med["raw_socket_4MiB"])
        for name in ["memcpy_torch", "memcpy_numpy", "raw_socket", "raw_socket_4MiB"]:
            rows.append({"system": name, "tokens": tokens, "num_bytes": num_bytes,
                         "latency_s": median_and_spread(times[name]), "gbps": num_bytes / med[name] / 1e9})
        for name, xs in times.items():
            if "/" not in name or ":" in name:
                continue
            transport, ids = name.split("/")
            row: dict[str, Any] = {"system": transport, "ids": ids, "tokens": tokens,
                                   "latency_s": median_and_spread(xs)}
            if ids == "notice-only":
                row["num_bytes"] = 0
                rows.append(row)
                continue
            limit_s = best_memcpy if transport == "shm" else best_raw
            row.update({
                "num_bytes": num_bytes, "gbps": num_bytes / med[name] / 1e9,
                "limit": "memcpy (faster of torch, numpy)" if transport == "shm" else "raw socket (faster)",
                "ratio_to_limit": limit_s / med[name],
                "sender_send_s": statistics.median(times[f"{name}:send"]),
                "receiver_transfer_s": statistics.median(times[f"{name}:receiver"]),
            })
            if transport == "shm":  # data is in place when send_blocks returns: the copy alone vs memcpy
                row["data_path_ratio_to_limit"] = limit_s / row["sender_send_s"]
            rows.append(row)
        print(f"  done {tokens} tokens", file=sys.stderr)

    overlap: list[dict[str, Any]] = []
    if "overlap" in args.phases:
        overlap = run_overlap(args.transports, args.overlap_chunks, args.overlap_tokens,
                              args.overlap_reps, args.overlap_warmup)
        print("  done overlap", file=sys.stderr)

    print_transfer(rows, args)
    print_overlap(overlap)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"load average (1 min) before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}")
    result = {"scenario": "S4", "machine": {**machine_info(), "load_avg_before": load_before},
              "config": {"layers": NUM_LAYERS, "kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM,
                         "dtype": DTYPE, "block_size": BLOCK_SIZE, "reps": args.reps, "warmup": args.warmup,
                         "target_ratio": TARGET_RATIO, "command": " ".join(sys.argv)},
              "results": rows, "overlap": overlap}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


def print_transfer(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    if not rows:
        return
    print(f"\nS4 KV transfer — bench-50m shape ({NUM_LAYERS} layers × K,V; {NUM_KV_HEADS} kv heads × "
          f"{HEAD_DIM}, {DTYPE}, block {BLOCK_SIZE}); median of {args.reps} interleaved rounds "
          f"after {args.warmup} warm-up\n")
    print(f"{'system':<16}{'ids':<12}{'tokens':>7}{'MiB':>7}{'latency ms':>12}{'GB/s':>8}"
          f"{'vs limit':>10}{'copy only':>11}{'target':>8}")
    for r in rows:
        ratio = r.get("ratio_to_limit")
        data_ratio = r.get("data_path_ratio_to_limit")
        verdict = "" if ratio is None else ("ok" if ratio >= TARGET_RATIO else "MISS")
        print(f"{r['system']:<16}{r.get('ids', ''):<12}{r['tokens']:>7}{r['num_bytes'] / 2**20:>7.1f}"
              f"{r['latency_s']['median'] * 1e3:>12.3f}{r.get('gbps', 0.0):>8.2f}"
              f"{'' if ratio is None else f'{ratio:.0%}':>10}"
              f"{'' if data_ratio is None else f'{data_ratio:.0%}':>11}{verdict:>8}")
    print("\nlatency: P's first send_blocks → D's poll() returns the done notice.\n"
          "vs limit: the limit's time / this time; limit = the faster plain memcpy (torch, numpy) for shm,\n"
          "  the faster raw loopback socket (kernel-tuned or 4 MiB socket buffers, as the KV links use)\n"
          f"  for tcp; target ≥ {TARGET_RATIO:.0%}.\n"
          "copy only (shm): the same ratio for the copy alone (the send_blocks calls; data is in place when\n"
          "  they return). notice-only: a request with no blocks (the done notice alone).")


if __name__ == "__main__":
    main()
