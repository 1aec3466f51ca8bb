"""The KV-transfer contract: a prefill worker pushes KV blocks into a decode worker's cache.

Lifecycle of one hand-off (request R, prefill worker P, decode worker D):

1. D builds a :class:`KVReceiver`; the receiver allocates D's whole KV cache
   (so that ``shm`` can place it in shared memory) and D's model runner uses
   ``receiver.kv_caches`` as its cache. ``receiver.descriptor()`` travels to P
   inside D's registration message.
2. P builds one :class:`KVSender` over its own ``kv_caches`` and calls
   ``connect(D, descriptor)`` once per peer; the connection is reused.
3. D reserves blocks for R's prompt and tells P their ids (via the router).
4. After each layer of each prompt chunk, P calls ``send_blocks`` with the
   blocks that chunk touched (its own ids → D's reserved ids), K and V.
5. After the last layer of the last chunk P calls ``send_done`` with the first
   token as an opaque payload (or ``send_abort`` if it gives up on R).
6. D's main loop calls ``poll()``; a :class:`KVDone` for R means every block
   write of R is in D's cache (or, with ``error`` set, that R's transfer failed
   and no further write of R will arrive).

Methods, by side:

* sender (prefill side), :class:`KVSender`:
  ``connect(peer_id, descriptor)`` · ``disconnect(peer_id)`` ·
  ``send_blocks(peer_id, request_id, layer, src_block_ids, dst_block_ids)`` ·
  ``send_done(peer_id, request_id, payload)`` ·
  ``send_abort(peer_id, request_id, reason)`` · ``stats()`` · ``close()``
* receiver (decode side), :class:`KVReceiver`:
  ``kv_caches`` · ``descriptor()`` · ``poll(timeout_s=0)`` · ``discard(request_id)`` ·
  ``stats()`` · ``close()``
* helpers: :func:`make_receiver`, :func:`make_sender`, :func:`choose_transport`,
  :func:`host_id`.

Who owns and frees what:

* The receiver owns D's KV tensors; they live until ``receiver.close()`` (for
  ``shm``: the segment is unlinked there; see ``shm.py`` for crash cleanup).
  Which *blocks* are free is D's block manager's business, not the receiver's.
* The sender never owns KV memory: it reads P's ``kv_caches`` when asked. A
  transport may read the source blocks after ``send_blocks`` returns (``tcp``
  sends zero-copy views), so P must keep the source blocks unchanged until D
  acknowledges R (P keeps them under a lease anyway).
* D must not hand R's reserved blocks to another request while P may still
  write them: only after ``poll()`` reported R (done or error), or once P is
  known to be gone. ``shm`` writes land directly in D's memory and cannot be
  refused by D.
* Receiver bookkeeping for R is dropped when ``poll()`` reports R, or by
  ``discard(R)`` (D gave up on R, e.g. timeout; R's later tcp writes are then
  dropped). Sender bookkeeping for R is dropped by ``send_done`` / ``send_abort``
  (or ``disconnect`` of its peer).
* A ``KVDone`` with ``error`` set (sender abort, or a write the receiver could
  not perform) carries no payload: check ``error`` before decoding ``payload``.
* Connections (sockets, shared-memory mappings of a peer's cache) are released
  by ``disconnect(peer_id)`` or ``close()``.

Authentication: every shm and tcp receiver draws a random ``token`` at
construction and puts it in its descriptor, which reaches only workers the
router has admitted. Every message on a link carries the token; the receiver
drops (and counts in ``stats().num_rejected``) any message without the right
one, before it touches KV memory or any request's state. The token is sent in
clear text, so it keeps out processes that do not know it, not eavesdroppers:
receivers bind to 127.0.0.1 by default; bind to another address only on a
network whose traffic the cluster's operator trusts. ``shm`` writes go straight
into the segment, which only the receiver's OS user can open (see ``shm.py``).
"""

from __future__ import annotations

import functools
import importlib
import os
import socket
from abc import ABC, abstractmethod
from typing import Any

import msgspec
import torch

from pdserve.transfer.descriptor import ITEMSIZES, KVDescriptor, KVLayout, TransferError

__all__ = [  # KVLayout, KVDescriptor and TransferError live in descriptor.py (torch-free) but belong here
    "ITEMSIZES", "TRANSPORTS", "KVCaches", "KVDescriptor", "KVDone", "KVLayout", "KVReceiver", "KVSender",
    "PeerStats", "ReceiveStats", "TransferError", "TransferStats", "choose_transport", "host_id",
    "make_receiver", "make_sender",
]

TRANSPORTS = ("fake", "shm", "tcp")

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (K, V), each [num_blocks, block_size, H, D]


class KVDone(msgspec.Struct):
    """One finished transfer as seen by the receiver (check ``error`` before using ``payload``).

    ``num_bytes``: K+V bytes received for the request; ``transfer_s``: seconds
    from its first byte to the done notice (for ``shm`` the first byte is the
    sender's first write, same-host monotonic clock). ``error`` is None on
    success; otherwise the transfer failed or was aborted by the sender, the
    blocks' contents are undefined and no further write of the request follows.
    """

    request_id: str
    payload: bytes
    num_bytes: int
    transfer_s: float
    error: str | None = None


class PeerStats(msgspec.Struct):
    """Cumulative sender-side figures for one peer.

    ``send_s`` is time spent inside ``send_*`` calls on the caller's thread (what
    the transfer costs the compute loop); ``transfer_s`` sums, over finished
    requests, the time from their first ``send_blocks`` to ``send_done``.
    """

    transport: str
    num_bytes: int = 0
    num_block_sends: int = 0
    num_requests: int = 0
    num_aborted: int = 0
    send_s: float = 0.0
    transfer_s: float = 0.0

    def add(self, other: PeerStats) -> None:
        self.num_bytes += other.num_bytes
        self.num_block_sends += other.num_block_sends
        self.num_requests += other.num_requests
        self.num_aborted += other.num_aborted
        self.send_s += other.send_s
        self.transfer_s += other.transfer_s


class ReceiveStats(msgspec.Struct):
    """Cumulative receiver-side figures: finished requests (failed ones included), bytes, seconds.

    ``num_rejected``: messages dropped unread because they lacked the receiver's
    token (or could not be decoded far enough to find it); they touch no request.
    """

    num_requests: int = 0
    num_failed: int = 0
    num_bytes: int = 0
    transfer_s: float = 0.0
    num_rejected: int = 0


class TransferStats(msgspec.Struct):
    """Cumulative sender-side figures per peer (a snapshot; safe to keep)."""

    peers: dict[str, PeerStats] = msgspec.field(default_factory=dict)

    def by_transport(self) -> dict[str, PeerStats]:
        out: dict[str, PeerStats] = {}
        for p in self.peers.values():
            out.setdefault(p.transport, PeerStats(p.transport)).add(p)
        return out

    @property
    def num_bytes(self) -> int:
        return sum(p.num_bytes for p in self.peers.values())

    @property
    def num_transfers(self) -> int:
        """Requests finished with ``send_done`` (aborted ones not included)."""
        return sum(p.num_requests for p in self.peers.values())

    @property
    def transports(self) -> set[str]:
        return {p.transport for p in self.peers.values()}


class KVReceiver(ABC):
    """Decode side. Owns ``kv_caches`` (per layer (K, V), ``[num_blocks, block_size, H, D]``)."""

    kv_caches: KVCaches
    layout: KVLayout

    @abstractmethod
    def descriptor(self) -> KVDescriptor:
        """What senders need to reach this receiver."""

    @abstractmethod
    def poll(self, timeout_s: float = 0.0) -> list[KVDone]:
        """Transfers finished since the last poll, their data fully in ``kv_caches``.

        Never blocks by default (D's main loop polls every step); an idle D may
        wait up to ``timeout_s`` for the first one.
        """

    @abstractmethod
    def stats(self) -> ReceiveStats:
        """Cumulative figures over every request ``poll()`` has reported or will report."""

    @abstractmethod
    def discard(self, request_id: str) -> None:
        """Forget a request D gave up on (e.g. timed out): nothing of it is reported any more, and its
        later writes are dropped where the transport can refuse them (tcp, fake; not shm)."""

    @abstractmethod
    def close(self) -> None:
        """Stop receiving and release the cache memory (idempotent)."""


class KVSender(ABC):
    """Prefill side. Reads the local ``kv_caches`` it was built over; owns no KV memory."""

    @abstractmethod
    def connect(self, peer_id: str, descriptor: KVDescriptor) -> None:
        """Idempotent; one connection per peer, reused. A changed descriptor reconnects."""

    @abstractmethod
    def disconnect(self, peer_id: str) -> None:
        """Release the connection to a peer (its socket, its mapped cache); unknown peers are ignored."""

    @abstractmethod
    def send_blocks(
        self, peer_id: str, request_id: str, layer: int, src_block_ids: list[int], dst_block_ids: list[int]
    ) -> None:
        """Push K and V of one layer's blocks; may be asynchronous but stays ordered with ``send_done``."""

    @abstractmethod
    def send_done(self, peer_id: str, request_id: str, payload: bytes) -> None:
        """After every ``send_blocks`` of the request: D reports it once all those writes are in place."""

    @abstractmethod
    def send_abort(self, peer_id: str, request_id: str, reason: str) -> None:
        """Give up on a request: D reports it with ``error=reason``; no write of it follows."""

    @abstractmethod
    def stats(self) -> TransferStats:
        """Cumulative bytes and seconds per peer (``by_transport()`` for per-transport sums)."""

    @abstractmethod
    def close(self) -> None:
        """Disconnect every peer (idempotent)."""


# --------------------------------------------------------------------------- helpers


@functools.cache
def host_id() -> str:
    """A stable id for this host: hostname, kernel boot id, and the /dev/shm mount.

    The /dev/shm device number is part of it because two containers on one
    kernel share shared memory only if they share that mount. ``PDSERVE_HOST_ID``
    overrides it: the Ray launcher sets it to the Ray node id, so workers pair
    over shm only within one Ray node (simulated nodes share one machine).
    """
    override = os.environ.get("PDSERVE_HOST_ID", "").strip()
    if override:
        return override
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "noboot"
    try:
        shm_dev = str(os.stat("/dev/shm").st_dev)
    except OSError:
        shm_dev = "noshm"
    return f"{socket.gethostname()}/{boot}/{shm_dev}"


def choose_transport(local_host_id: str, descriptor: KVDescriptor, override: str | None = None) -> str:
    """The transport a sender on ``local_host_id`` uses to reach ``descriptor``.

    ``shm`` when the receiver's cache is in shared memory (a CPU cache) and both
    sides are on one host, else ``tcp``; a ``fake`` receiver needs ``fake``.
    ``override`` forces a transport and raises :class:`TransferError` if impossible
    (``None`` or ``"auto"``: choose).
    """
    if override == "auto":
        override = None
    if override is not None and override not in TRANSPORTS:
        raise TransferError(f"transport override {override!r} is not one of {', '.join(TRANSPORTS)}")
    if descriptor.transport == "fake" or override == "fake":
        if descriptor.transport != "fake" or override not in (None, "fake"):
            raise TransferError(
                f"transport {override!r} cannot reach a {descriptor.transport!r} receiver: "
                "fake receivers only talk to fake senders in the same process"
            )
        return "fake"
    same_host = descriptor.host_id == local_host_id
    if override == "shm":
        if descriptor.shm_name is None:
            raise TransferError(
                f"transport 'shm' forced, but the receiver at {descriptor.endpoint} keeps its cache "
                f"outside shared memory (its transport is {descriptor.transport!r}); use 'tcp'"
            )
        if not same_host:
            raise TransferError(
                f"transport 'shm' forced, but the receiver is on host {descriptor.host_id!r} "
                f"and this sender on {local_host_id!r}; use 'tcp'"
            )
        return "shm"
    if override == "tcp":
        return "tcp"
    return "shm" if same_host and descriptor.shm_name is not None else "tcp"


_RECEIVERS = {"fake": "pdserve.transfer.fake:FakeReceiver",
              "shm": "pdserve.transfer.shm:ShmReceiver",
              "tcp": "pdserve.transfer.tcp:TcpReceiver"}


def _load(path: str) -> Any:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def make_receiver(
    transport: str,
    layout: KVLayout,
    device: str | torch.device = "cpu",
    bind_host: str = "127.0.0.1",
    **options: Any,
) -> KVReceiver:
    """Build a receiver of the given kind (it allocates the KV cache, zeroed).

    ``auto``: ``shm`` for a CPU cache (same-host senders copy straight into it,
    other hosts' senders use tcp), ``tcp`` on CUDA. ``shm`` receivers also accept
    ``tcp`` senders; ``tcp`` receivers may live on CUDA. Extra options go to the
    receiver's constructor (``advertise_host``, ``socket_buffer_bytes`` for
    shm/tcp, ``name`` for fake).
    """
    if transport == "auto":
        transport = "shm" if torch.device(device).type == "cpu" and os.path.isdir("/dev/shm") else "tcp"
    if transport not in _RECEIVERS:
        raise TransferError(f"unknown transport {transport!r}; use auto or one of {', '.join(TRANSPORTS)}")
    cls = _load(_RECEIVERS[transport])
    if transport == "fake":
        receiver: KVReceiver = cls(layout, device, **options)
    else:
        receiver = cls(layout, device, bind_host=bind_host, **options)
    return receiver


def make_sender(
    local_kv_caches: KVCaches,
    *,
    local_host_id: str | None = None,
    override: str | None = None,
    **options: Any,
) -> KVSender:
    """A sender over P's cache that picks a transport per peer with :func:`choose_transport`.

    ``override`` forces one transport for every peer (None or ``auto``: choose per
    peer); ``options`` go to the
    per-transport senders (e.g. ``send_timeout_s`` for tcp).
    """
    from pdserve.transfer.multi import MultiSender

    return MultiSender(local_kv_caches, local_host_id=local_host_id, override=override, **options)
