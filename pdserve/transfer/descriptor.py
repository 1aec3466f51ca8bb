"""Torch-free types that travel between processes: a receiver's cache layout and address.

The router and the worker protocol import this module without importing
torch (which costs seconds of start-up).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from pdserve.errors import PDServeError

if TYPE_CHECKING:
    import torch

ITEMSIZES = {"float32": 4, "bfloat16": 2, "float16": 2}  # the dtypes a KV cache may have, and their sizes


class TransferError(PDServeError):
    """A KV transfer cannot be set up or carried out; the message says which peer and why."""


class KVLayout(msgspec.Struct, frozen=True):
    """Shape of one worker's KV cache: per layer K and V of ``[num_blocks, block_size, heads, head_dim]``."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # "float32" / "bfloat16" / "float16"

    def __post_init__(self) -> None:
        if self.dtype not in ITEMSIZES:
            raise TransferError(f"KVLayout dtype={self.dtype!r} is not one of {', '.join(ITEMSIZES)}")
        for name in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise TransferError(f"KVLayout {name}={getattr(self, name)} must be ≥ 1")

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        dtype: torch.dtype = getattr(torch, self.dtype)
        return dtype

    @property
    def block_shape(self) -> tuple[int, int, int]:
        return (self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of K (or of V) of one layer."""
        return self.block_size * self.num_kv_heads * self.head_dim * ITEMSIZES[self.dtype]

    @property
    def tensor_bytes(self) -> int:
        """Bytes of one layer's K (or V) tensor."""
        return self.num_blocks * self.block_bytes

    @classmethod
    def of(cls, kv_caches: list[tuple[Any, Any]]) -> KVLayout:
        """The layout of existing cache tensors (per layer (K, V); all layers must agree)."""
        if not kv_caches:
            raise TransferError("kv_caches is empty: need one (K, V) pair per layer")
        k0 = kv_caches[0][0]
        for layer, (k, v) in enumerate(kv_caches):
            if k.shape != k0.shape or v.shape != k0.shape or k.dtype != k0.dtype or v.dtype != k0.dtype:
                raise TransferError(
                    f"kv_caches layer {layer}: K {tuple(k.shape)}/{k.dtype}, V {tuple(v.shape)}/{v.dtype} "
                    f"differ from layer 0's {tuple(k0.shape)}/{k0.dtype}"
                )
            if not (k.is_contiguous() and v.is_contiguous()):
                raise TransferError(f"kv_caches layer {layer}: K and V must be contiguous")
        if k0.dim() != 4:
            raise TransferError(f"KV tensors must be [num_blocks, block_size, heads, head_dim]: {k0.shape}")
        dtype = str(k0.dtype).removeprefix("torch.")
        if dtype not in ITEMSIZES:
            raise TransferError(f"KV dtype {k0.dtype} is not one of {', '.join(ITEMSIZES)}")
        nb, bs, h, d = k0.shape
        return cls(len(kv_caches), nb, bs, h, d, dtype)

    def compatible_with(self, other: KVLayout) -> bool:
        """Same per-block shape, dtype and layer count (block counts may differ)."""
        return (self.num_layers, self.block_shape, self.dtype) == (
            other.num_layers, other.block_shape, other.dtype)


class KVDescriptor(msgspec.Struct, frozen=True):
    """Everything a sender needs to reach a receiver; travels inside registration messages.

    ``transport`` is the receiver's kind (``fake``, ``shm``, ``tcp``); ``endpoint``
    is a ZeroMQ address (or the fake registry name); ``shm_name`` is set only when
    the cache is in a shared-memory segment that same-host senders may attach.
    ``token`` is the receiver's random secret (shm and tcp; empty for fake): every
    message on its link must carry it, or the receiver drops the message. It is
    a credential: the descriptor travels only over the cluster's control links
    (worker → router → prefill worker), and ``repr`` leaves the token out so that
    logging a descriptor (or a message holding one) does not leak it.
    """

    transport: str
    endpoint: str
    host_id: str
    layout: KVLayout
    shm_name: str | None = None
    token: str = ""

    def __repr__(self) -> str:
        return (f"KVDescriptor(transport={self.transport!r}, endpoint={self.endpoint!r}, "
                f"host_id={self.host_id!r}, layout={self.layout!r}, shm_name={self.shm_name!r}, "
                f"token={'<set>' if self.token else '<none>'})")

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        fields = [(name, getattr(self, name)) for name in self.__struct_fields__ if name != "token"]
        return [*fields, ("token", "<set>" if self.token else "<none>")]
