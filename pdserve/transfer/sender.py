"""What every sender shares: peer table, argument checks, timing and stats.

A transport subclasses :class:`SenderBase` and implements five hooks:
``_open`` / ``_close_peer`` (a connection), ``_put_blocks``, ``_put_done`` and
``_put_abort`` (the three messages, in the order they are called).
"""

from __future__ import annotations

import time
from abc import abstractmethod
from typing import ClassVar

import numpy as np

from pdserve.transfer.base import KVCaches, KVDescriptor, KVLayout, KVSender, TransferError, TransferStats
from pdserve.transfer.blocks import byte_view, check_ids
from pdserve.transfer.ledger import SendLedger


class SenderBase(KVSender):
    """Checks arguments, times every call and keeps the ledger; subclasses move the bytes."""

    transport: ClassVar[str]

    def __init__(self, local_kv_caches: KVCaches) -> None:
        self.kv_caches = local_kv_caches
        self.layout = KVLayout.of(local_kv_caches)
        # numpy byte views of CPU layers, built once: [num_blocks, block_bytes]
        self._views: list[tuple[np.ndarray, np.ndarray] | None] = [
            (byte_view(k), byte_view(v)) if k.device.type == "cpu" else None for k, v in local_kv_caches
        ]
        self._peers: dict[str, KVDescriptor] = {}
        self._ledger = SendLedger()
        self._closed = False

    # -- hooks --------------------------------------------------------------
    @abstractmethod
    def _open(self, peer_id: str, descriptor: KVDescriptor) -> None: ...

    @abstractmethod
    def _close_peer(self, peer_id: str) -> None: ...

    @abstractmethod
    def _put_blocks(self, peer_id: str, request_id: str, layer: int,
                    src_block_ids: list[int], dst_block_ids: list[int]) -> None: ...

    @abstractmethod
    def _put_done(self, peer_id: str, request_id: str, payload: bytes,
                  num_bytes: int, first_s: float | None) -> None: ...

    @abstractmethod
    def _put_abort(self, peer_id: str, request_id: str, reason: str) -> None: ...

    def _shutdown(self) -> None:
        """Release what is shared by all peers (after every peer was closed)."""

    # -- contract -------------------------------------------------------------
    def connect(self, peer_id: str, descriptor: KVDescriptor) -> None:
        if self._closed:
            raise TransferError(f"{self.transport} sender is closed; cannot connect to {peer_id}")
        old = self._peers.get(peer_id)
        if old == descriptor:
            return
        if old is not None:
            self.disconnect(peer_id)
        if not self.layout.compatible_with(descriptor.layout):
            raise TransferError(
                f"peer {peer_id}: its KV layout {descriptor.layout} does not match this sender's "
                f"{self.layout} (layers, block size, heads, head_dim and dtype must agree)"
            )
        self._open(peer_id, descriptor)
        self._peers[peer_id] = descriptor
        self._ledger.add_peer(peer_id, self.transport)

    def disconnect(self, peer_id: str) -> None:
        if self._peers.pop(peer_id, None) is not None:
            self._close_peer(peer_id)
            self._ledger.drop_peer(peer_id)

    def _descriptor(self, peer_id: str) -> KVDescriptor:
        desc = self._peers.get(peer_id)
        if desc is None:
            raise TransferError(f"peer {peer_id!r} is not connected to this {self.transport} sender")
        return desc

    def send_blocks(
        self, peer_id: str, request_id: str, layer: int, src_block_ids: list[int], dst_block_ids: list[int]
    ) -> None:
        start_s = time.monotonic()
        desc = self._descriptor(peer_id)
        if not 0 <= layer < self.layout.num_layers:
            raise TransferError(f"layer {layer} is outside [0, {self.layout.num_layers})")
        if len(src_block_ids) != len(dst_block_ids):
            raise TransferError(
                f"request {request_id}: {len(src_block_ids)} source blocks, {len(dst_block_ids)} destinations"
            )
        if not src_block_ids:
            return
        check_ids(src_block_ids, self.layout.num_blocks, "source")
        check_ids(dst_block_ids, desc.layout.num_blocks, f"peer {peer_id} destination")
        self._put_blocks(peer_id, request_id, layer, src_block_ids, dst_block_ids)
        num_bytes = 2 * len(src_block_ids) * self.layout.block_bytes
        self._ledger.on_blocks(peer_id, request_id, num_bytes, start_s, time.monotonic())

    def send_done(self, peer_id: str, request_id: str, payload: bytes) -> None:
        start_s = time.monotonic()
        self._descriptor(peer_id)
        p = self._ledger.pending(peer_id, request_id)
        self._put_done(peer_id, request_id, payload, p.num_bytes if p else 0, p.first_s if p else None)
        self._ledger.on_finish(peer_id, request_id, start_s, time.monotonic(), aborted=False)

    def send_abort(self, peer_id: str, request_id: str, reason: str) -> None:
        start_s = time.monotonic()
        self._descriptor(peer_id)
        self._put_abort(peer_id, request_id, reason)
        self._ledger.on_finish(peer_id, request_id, start_s, time.monotonic(), aborted=True)

    def stats(self) -> TransferStats:
        return self._ledger.snapshot()

    def close(self) -> None:
        if self._closed:
            return
        for peer_id in list(self._peers):
            self.disconnect(peer_id)
        self._shutdown()
        self._closed = True
