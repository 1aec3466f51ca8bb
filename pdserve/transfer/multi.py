"""A sender that picks a transport per peer and delegates to one sender per transport.

1. ``connect(peer, descriptor)`` asks :func:`choose_transport` (same host and a
   shared-memory cache → ``shm``, else ``tcp``; ``fake`` for fake receivers),
   builds that transport's sender on first use, and connects the peer there.
   If an automatically chosen ``shm`` attach fails, the peer falls back to ``tcp``.
2. Every other call goes to the peer's transport, so order per peer is kept.
"""

from __future__ import annotations

import logging
from typing import Any

from pdserve.transfer.base import (
    KVCaches,
    KVDescriptor,
    KVSender,
    TransferError,
    TransferStats,
    choose_transport,
    host_id,
)

logger = logging.getLogger(__name__)


def _sender_class(transport: str) -> type[KVSender]:
    if transport == "shm":
        from pdserve.transfer.shm import ShmSender

        return ShmSender
    if transport == "tcp":
        from pdserve.transfer.tcp import TcpSender

        return TcpSender
    from pdserve.transfer.fake import FakeSender

    return FakeSender


class MultiSender(KVSender):
    """One sender over P's cache for peers reached by different transports."""

    def __init__(
        self,
        local_kv_caches: KVCaches,
        *,
        local_host_id: str | None = None,
        override: str | None = None,
        senders: dict[str, KVSender] | None = None,
        **options: Any,
    ) -> None:
        """``senders`` pre-sets the sender of a transport (tests inject a faulty FakeSender so);
        ``options`` go to the constructors of the shm and tcp senders."""
        self.kv_caches = local_kv_caches
        self.host_id = local_host_id or host_id()
        self.override = override
        self._options = options
        self._senders: dict[str, KVSender] = dict(senders or {})
        self._peer_transport: dict[str, str] = {}

    def _sender(self, transport: str) -> KVSender:
        sender = self._senders.get(transport)
        if sender is None:
            cls = _sender_class(transport)
            options = self._options if transport != "fake" else {}
            sender = self._senders[transport] = cls(self.kv_caches, **options)  # type: ignore[call-arg]
        return sender

    def transport_of(self, peer_id: str) -> str | None:
        return self._peer_transport.get(peer_id)

    def connect(self, peer_id: str, descriptor: KVDescriptor) -> None:
        transport = choose_transport(self.host_id, descriptor, self.override)
        old = self._peer_transport.get(peer_id)
        if old is not None and old != transport:
            self.disconnect(peer_id)
        try:
            self._sender(transport).connect(peer_id, descriptor)
        except TransferError as e:
            if transport != "shm" or self.override == "shm":
                raise
            logger.warning("peer %s: shared memory unavailable (%s); using tcp", peer_id, e)
            transport = "tcp"
            self._sender(transport).connect(peer_id, descriptor)
        self._peer_transport[peer_id] = transport

    def _for(self, peer_id: str) -> KVSender:
        transport = self._peer_transport.get(peer_id)
        if transport is None:
            raise TransferError(f"peer {peer_id!r} is not connected")
        return self._senders[transport]

    def disconnect(self, peer_id: str) -> None:
        transport = self._peer_transport.pop(peer_id, None)
        if transport is not None:
            self._senders[transport].disconnect(peer_id)

    def send_blocks(
        self, peer_id: str, request_id: str, layer: int, src_block_ids: list[int], dst_block_ids: list[int]
    ) -> None:
        self._for(peer_id).send_blocks(peer_id, request_id, layer, src_block_ids, dst_block_ids)

    def send_done(self, peer_id: str, request_id: str, payload: bytes) -> None:
        self._for(peer_id).send_done(peer_id, request_id, payload)

    def send_abort(self, peer_id: str, request_id: str, reason: str) -> None:
        self._for(peer_id).send_abort(peer_id, request_id, reason)

    def stats(self) -> TransferStats:
        merged = TransferStats()
        for sender in self._senders.values():
            merged.peers.update(sender.stats().peers)
        return merged

    def close(self) -> None:
        for sender in self._senders.values():
            sender.close()
        self._peer_transport.clear()
