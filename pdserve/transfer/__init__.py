"""KV-cache transfer between prefill and decode workers (the contract is in ``base.py``).

Names are imported lazily: ``pdserve.transfer.descriptor`` (what the router
needs) must not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pdserve.transfer.base import (
        KVDescriptor,
        KVDone,
        KVLayout,
        KVReceiver,
        KVSender,
        PeerStats,
        ReceiveStats,
        TransferError,
        TransferStats,
        choose_transport,
        host_id,
        make_receiver,
        make_sender,
    )

__all__ = [
    "KVDescriptor",
    "KVDone",
    "KVLayout",
    "KVReceiver",
    "KVSender",
    "PeerStats",
    "ReceiveStats",
    "TransferError",
    "TransferStats",
    "choose_transport",
    "host_id",
    "make_receiver",
    "make_sender",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("pdserve.transfer.base"), name)
    raise AttributeError(f"module 'pdserve.transfer' has no attribute {name!r}")
