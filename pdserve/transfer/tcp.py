"""``tcp``: KV blocks as ZeroMQ multipart frames over one PUSH→PULL connection per peer.

Lifecycle:

1. The receiver allocates its cache, draws a random token, binds a PULL socket
   on ``bind_host`` with an ephemeral port and starts one background thread
   that owns the socket. Its descriptor carries the endpoint and the token.
2. A sender connects one PUSH socket per peer and reuses it. ``send_blocks``
   sends ``[header, K bytes, V bytes]``: a single run of source blocks is sent
   zero-copy straight from the cache, several runs are gathered with one copy,
   a CUDA cache is gathered on the device and staged to CPU. Every header
   carries the peer's token.
3. The receiver's thread first checks the token (``hmac.compare_digest``): a
   message without the right one is dropped whole, counted in
   ``stats().num_rejected`` and logged (at most once a minute per peer address,
   without its contents). Otherwise it copies K and V into its cache (numpy
   copies release the GIL, so D's main loop keeps running), in arrival order,
   or records a done notice; ``poll()`` hands those to D.

Messages of one connection arrive in order, so a done notice is handled only
after every earlier write of its request is in the cache.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
import threading
import time
from typing import Any, ClassVar

import numpy as np
import torch
import zmq

from pdserve.transfer.base import (
    KVCaches,
    KVDescriptor,
    KVDone,
    KVLayout,
    KVReceiver,
    ReceiveStats,
    TransferError,
    host_id,
)
from pdserve.transfer.blocks import byte_view, gather_blocks, scatter_blocks
from pdserve.transfer.ledger import ReceiveLedger
from pdserve.transfer.sender import SenderBase
from pdserve.transfer.wire import (
    SOCKET_BUFFER_BYTES,
    Abort,
    Blocks,
    Done,
    PushLinks,
    decoder,
    encoder,
    require_token,
)

logger = logging.getLogger(__name__)

POLL_INTERVAL_MS = 100  # how often the receiver thread checks for close()
REJECT_LOG_INTERVAL_S = 60.0  # rejected messages are logged at most this often per peer address
MAX_REJECT_PEERS = 1024  # peer addresses remembered for rate-limiting those logs


class ZmqReceiver(KVReceiver):
    """A cache plus a PULL socket served by a background thread (base of tcp and shm receivers)."""

    transport: ClassVar[str] = "tcp"

    def __init__(
        self,
        layout: KVLayout,
        device: str | torch.device = "cpu",
        *,
        bind_host: str = "127.0.0.1",
        advertise_host: str | None = None,
        socket_buffer_bytes: int | None = SOCKET_BUFFER_BYTES,
    ) -> None:
        """``advertise_host``: the address senders should dial when binding to all interfaces."""
        self.layout = layout
        self.device = torch.device(device)
        self.kv_caches = self._allocate()
        self._views: list[tuple[np.ndarray, np.ndarray] | None] = [
            (byte_view(k), byte_view(v)) if k.device.type == "cpu" else None for k, v in self.kv_caches
        ]
        self._ledger = ReceiveLedger()
        self._token = secrets.token_hex(16)
        self._token_bytes = self._token.encode()
        self._reject_logged_s: dict[str, float] = {}  # peer address → when a rejection was last logged
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        if socket_buffer_bytes:
            self._sock.setsockopt(zmq.RCVBUF, socket_buffer_bytes)
        try:
            port = self._sock.bind_to_random_port(f"tcp://{bind_host}")
        except zmq.ZMQError as e:
            self._sock.close()
            self._ctx.term()
            self._release()
            raise TransferError(f"KV receiver cannot bind to {bind_host!r}: {e}") from e
        host = advertise_host or (socket.gethostname() if bind_host in ("0.0.0.0", "*", "::") else bind_host)
        self._endpoint = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
        self._host_id = host_id()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"kv-{self.transport}-recv", daemon=True)
        self._thread.start()
        self._closed = False

    def _allocate(self) -> KVCaches:
        shape = (self.layout.num_blocks, *self.layout.block_shape)
        dtype = self.layout.torch_dtype
        return [
            (torch.zeros(shape, dtype=dtype, device=self.device),
             torch.zeros(shape, dtype=dtype, device=self.device))
            for _ in range(self.layout.num_layers)
        ]

    def _shm_name(self) -> str | None:
        return None

    def descriptor(self) -> KVDescriptor:
        return KVDescriptor(self.transport, self._endpoint, self._host_id, self.layout, self._shm_name(),
                            token=self._token)

    def poll(self, timeout_s: float = 0.0) -> list[KVDone]:
        return self._ledger.poll(timeout_s)

    def stats(self) -> ReceiveStats:
        return self._ledger.stats()

    def discard(self, request_id: str) -> None:
        self._ledger.discard(request_id)

    # -- background thread ------------------------------------------------------
    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(POLL_INTERVAL_MS):
                    continue
                while True:
                    try:
                        frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(frames)
        except Exception:  # the thread must not die silently: D would wait for done notices forever
            logger.exception("KV %s receiver at %s stopped", self.transport, self._endpoint)
        finally:
            self._sock.close()

    def _handle(self, frames: list[Any]) -> None:
        try:
            msg = decoder.decode(frames[0].buffer)
        except Exception:  # no token can be found in it: reject (our senders never send such)
            self._reject(frames[0])
            return
        if not hmac.compare_digest(msg.token.encode(), self._token_bytes):
            self._reject(frames[0])
            return
        if isinstance(msg, Blocks):
            try:
                self._write(msg, frames)
            except Exception as e:
                logger.error("KV receiver: write of request %s failed: %s", msg.request_id, e)
                self._ledger.on_abort(msg.request_id, f"receiver failed to write blocks: {e}")
                self._ledger.discard(msg.request_id)  # drop its remaining writes and done
        elif isinstance(msg, Done):
            self._ledger.on_done(msg.request_id, msg.payload, msg.num_bytes, msg.first_s,
                                 count_sender_bytes=msg.direct)
        else:
            assert isinstance(msg, Abort)
            self._ledger.on_abort(msg.request_id, msg.reason)

    def _reject(self, frame: Any) -> None:
        """Count a message without the right token and log it, rate-limited per peer, without its contents."""
        num_rejected = self._ledger.on_rejected()
        try:
            peer = str(frame.get("Peer-Address"))
        except (zmq.ZMQError, AttributeError):  # not a tcp connection, or libzmq too old
            peer = "an unknown peer"
        now = time.monotonic()
        last_s = self._reject_logged_s.get(peer)
        if last_s is not None and now - last_s < REJECT_LOG_INTERVAL_S:
            return
        if len(self._reject_logged_s) >= MAX_REJECT_PEERS:
            self._reject_logged_s.clear()
        self._reject_logged_s[peer] = now
        logger.warning(
            "KV %s receiver at %s: dropped a message from %s without this receiver's token "
            "(%d dropped so far; logged at most every %.0f s per peer)",
            self.transport, self._endpoint, peer, num_rejected, REJECT_LOG_INTERVAL_S,
        )

    def _write(self, msg: Blocks, frames: list[Any]) -> None:
        now = time.monotonic()
        layout = self.layout
        n = len(msg.dst_block_ids)
        num_bytes = n * layout.block_bytes
        if len(frames) != 3 or len(frames[1]) != num_bytes or len(frames[2]) != num_bytes:
            raise TransferError(f"malformed message: {len(frames)} frames, not header, K, V of {num_bytes} B")
        if not 0 <= msg.layer < layout.num_layers:
            raise TransferError(f"layer {msg.layer} is outside [0, {layout.num_layers})")
        if n and (min(msg.dst_block_ids) < 0 or max(msg.dst_block_ids) >= layout.num_blocks):
            raise TransferError(f"destination block ids outside [0, {layout.num_blocks})")
        if not self._ledger.on_blocks(msg.request_id, 2 * num_bytes, now):
            return  # discarded by D: its blocks may belong to another request by now
        k, v = self.kv_caches[msg.layer]
        views = self._views[msg.layer]
        kv_np = views if views is not None else (None, None)
        for frame, dst, dst_np in ((frames[1], k, kv_np[0]), (frames[2], v, kv_np[1])):
            data = np.frombuffer(frame.buffer, dtype=np.uint8).reshape(n, layout.block_bytes)
            scatter_blocks(data, dst, dst_np, msg.dst_block_ids)

    # -- shutdown -----------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join()
        self._ctx.term()
        self._release()

    def _release(self) -> None:
        """Free the cache memory (the shm receiver also unlinks its segment)."""
        self._views = []
        self.kv_caches = []


class TcpReceiver(ZmqReceiver):
    """Receiver whose cache is ordinary (CPU or CUDA) memory; reachable from any host."""

    transport: ClassVar[str] = "tcp"


class TcpSender(SenderBase):
    """Sends blocks as ZeroMQ frames over one PUSH connection per peer; ZeroMQ's I/O thread sends."""

    transport: ClassVar[str] = "tcp"

    def __init__(
        self,
        local_kv_caches: KVCaches,
        *,
        send_timeout_s: float = 30.0,
        linger_s: float = 5.0,
        socket_buffer_bytes: int | None = SOCKET_BUFFER_BYTES,
    ) -> None:
        super().__init__(local_kv_caches)
        self._links = PushLinks(send_timeout_s, linger_s, socket_buffer_bytes)

    def _open(self, peer_id: str, descriptor: KVDescriptor) -> None:
        require_token(peer_id, descriptor)
        self._links.open(peer_id, descriptor.endpoint)

    def _close_peer(self, peer_id: str) -> None:
        self._links.close(peer_id)

    def _put_blocks(self, peer_id: str, request_id: str, layer: int,
                    src_block_ids: list[int], dst_block_ids: list[int]) -> None:
        k, v = self.kv_caches[layer]
        views = self._views[layer]
        k_np, v_np = views if views is not None else (None, None)
        k_bytes = gather_blocks(k, k_np, src_block_ids)  # [n, block_bytes]
        v_bytes = gather_blocks(v, v_np, src_block_ids)
        header = encoder.encode(Blocks(self._peers[peer_id].token, request_id, layer, dst_block_ids))
        self._links.send(peer_id, [header, k_bytes, v_bytes])

    def _put_done(self, peer_id: str, request_id: str, payload: bytes,
                  num_bytes: int, first_s: float | None) -> None:
        done = Done(self._peers[peer_id].token, request_id, payload, num_bytes, first_s, False)
        self._links.send(peer_id, [encoder.encode(done)])

    def _put_abort(self, peer_id: str, request_id: str, reason: str) -> None:
        self._links.send(peer_id, [encoder.encode(Abort(self._peers[peer_id].token, request_id, reason))])

    def _shutdown(self) -> None:
        self._links.shutdown()
