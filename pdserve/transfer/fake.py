"""``fake``: an in-process transport for tests and warm-up.

Receivers register under a name in a process-global registry (their
descriptor's endpoint); a sender looks the name up on ``connect`` and copies
blocks directly between tensors. It always succeeds unless a fault is
injected: ``FakeSender(fail_after_layers=N)`` raises :class:`TransferError` on
the (N+1)-th ``send_blocks``, ``stall_s`` sleeps before every send,
``drop_done`` silently loses done notices.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import ClassVar

import numpy as np
import torch

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
from pdserve.transfer.blocks import byte_view, copy_blocks
from pdserve.transfer.ledger import ReceiveLedger
from pdserve.transfer.sender import SenderBase

_registry: dict[str, FakeReceiver] = {}
_registry_lock = threading.Lock()
_names = itertools.count()


class FakeReceiver(KVReceiver):
    """Receiver reachable only from :class:`FakeSender` s in the same process."""

    def __init__(
        self, layout: KVLayout, device: str | torch.device = "cpu", *, name: str | None = None
    ) -> None:
        self.layout = layout
        shape = (layout.num_blocks, *layout.block_shape)
        dtype = layout.torch_dtype
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(layout.num_layers)
        ]
        self.views: list[tuple[np.ndarray, np.ndarray] | None] = [
            (byte_view(k), byte_view(v)) if k.device.type == "cpu" else None for k, v in self.kv_caches
        ]
        self.ledger = ReceiveLedger()
        self.name = name or f"fake-{next(_names)}"
        with _registry_lock:
            if self.name in _registry:
                raise TransferError(f"a fake receiver named {self.name!r} already exists")
            _registry[self.name] = self

    def descriptor(self) -> KVDescriptor:
        return KVDescriptor("fake", self.name, host_id(), self.layout)

    def poll(self, timeout_s: float = 0.0) -> list[KVDone]:
        return self.ledger.poll(timeout_s)

    def stats(self) -> ReceiveStats:
        return self.ledger.stats()

    def discard(self, request_id: str) -> None:
        self.ledger.discard(request_id)

    def close(self) -> None:
        with _registry_lock:
            if _registry.get(self.name) is self:
                del _registry[self.name]
        self.kv_caches = []
        self.views = []


class FakeSender(SenderBase):
    """Copies straight into registered fake receivers; optional fault injection."""

    transport: ClassVar[str] = "fake"

    def __init__(
        self,
        local_kv_caches: KVCaches,
        *,
        fail_after_layers: int | None = None,
        stall_s: float = 0.0,
        drop_done: bool = False,
    ) -> None:
        super().__init__(local_kv_caches)
        self.fail_after_layers = fail_after_layers
        self.stall_s = stall_s
        self.drop_done = drop_done
        self.num_block_sends = 0
        self._receivers: dict[str, FakeReceiver] = {}

    def _open(self, peer_id: str, descriptor: KVDescriptor) -> None:
        with _registry_lock:
            receiver = _registry.get(descriptor.endpoint)
        if receiver is None:
            raise TransferError(f"no fake receiver named {descriptor.endpoint!r} in this process")
        self._receivers[peer_id] = receiver

    def _close_peer(self, peer_id: str) -> None:
        self._receivers.pop(peer_id, None)

    def _put_blocks(self, peer_id: str, request_id: str, layer: int,
                    src_block_ids: list[int], dst_block_ids: list[int]) -> None:
        if self.stall_s:
            time.sleep(self.stall_s)
        if self.fail_after_layers is not None and self.num_block_sends >= self.fail_after_layers:
            raise TransferError(f"injected failure after {self.fail_after_layers} layer sends")
        self.num_block_sends += 1
        receiver = self._receivers[peer_id]
        if not receiver.ledger.on_blocks(request_id, 2 * len(src_block_ids) * self.layout.block_bytes,
                                         time.monotonic()):
            return
        src_views = self._views[layer] or (None, None)
        dst_views = receiver.views[layer] or (None, None)
        for i in range(2):
            copy_blocks(self.kv_caches[layer][i], src_block_ids, receiver.kv_caches[layer][i], dst_block_ids,
                        src_views[i], dst_views[i])

    def _put_done(self, peer_id: str, request_id: str, payload: bytes,
                  num_bytes: int, first_s: float | None) -> None:
        if self.stall_s:
            time.sleep(self.stall_s)
        if not self.drop_done:
            self._receivers[peer_id].ledger.on_done(request_id, payload, num_bytes, first_s,
                                                    count_sender_bytes=False)

    def _put_abort(self, peer_id: str, request_id: str, reason: str) -> None:
        self._receivers[peer_id].ledger.on_abort(request_id, reason)
