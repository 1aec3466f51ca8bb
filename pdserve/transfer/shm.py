"""``shm``: same-host transfer straight into the decode worker's shared-memory KV cache.

Lifecycle:

1. The receiver creates one POSIX shared-memory segment (``pdserve-kv-<pid>-<random>``,
   mode 0600) holding every layer's K and V, maps it with all pages faulted in
   and zeroed once (first touch of fresh pages is slow), and builds its
   ``kv_caches`` as tensors over it. It also binds a ZeroMQ PULL socket for
   done notices and draws the token that they must carry (as in ``tcp.py``).
2. A sender attaches the segment by name once per peer, mapped with all pages
   faulted in (``MAP_POPULATE``), and keeps the mapping until ``disconnect``.
3. ``send_blocks`` copies K and V of the given blocks from the sender's cache
   straight into the receiver's tensors: one copy, no serialisation, done on
   the caller's thread, so the data is in place when it returns.
4. ``send_done`` then pushes a small notice over ZeroMQ; D's ``poll()`` reports it.

Who may write D's cache:

* The segment is created with mode 0600 (set explicitly, whatever the umask),
  so only processes of the receiver's OS user (and root) can open and map it:
  on one host, the trust boundary of ``shm`` is the OS user. Such a process
  could write blocks without any token, so run each cluster's workers as a
  user of their own. The random part of the name avoids collisions; it is no
  secret (``/dev/shm`` can be listed).
* Done and abort notices go over the ZeroMQ link and are token-checked like
  tcp messages: a notice without the receiver's token is dropped and counted
  (``stats().num_rejected``), so a process that does not know the token cannot
  complete or abort a request, even though it can connect to the endpoint.

Memory ownership and crash safety:

* Only the receiver (creator) unlinks the segment, in ``close()``; the memory
  goes away once every process has unmapped it (senders do in ``disconnect``).
* The creator registers the segment with multiprocessing's resource tracker
  (as ``SharedMemory(create=True)`` would), whose process outlives a crashed receiver
  and unlinks the segment when the processes sharing that tracker have exited
  (for workers started with ``spawn``: the launcher's tracker).
* Senders do not use ``SharedMemory(name)`` to attach: before Python 3.13 that
  registers the segment with the *sender's* tracker, which would unlink the
  receiver's cache when the sender exits. They ``shm_open`` + ``mmap`` it.
* :func:`unlink_stale_segments` removes segments whose creating process is
  gone (for a launcher to call at start-up; pid-based, so only within one pid
  namespace).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import secrets
from multiprocessing import resource_tracker
from typing import ClassVar

import numpy as np
import torch

from pdserve.transfer.base import KVCaches, KVDescriptor, KVLayout, TransferError
from pdserve.transfer.blocks import block_runs, copy_blocks, copy_runs_np
from pdserve.transfer.sender import SenderBase
from pdserve.transfer.tcp import ZmqReceiver
from pdserve.transfer.wire import Abort, Done, PushLinks, encoder, require_token

try:
    import _posixshmem
except ImportError:  # not a POSIX system
    _posixshmem = None

logger = logging.getLogger(__name__)

SEGMENT_PREFIX = "pdserve-kv-"
ALIGN_BYTES = 4096  # every layer's K and V start on a page
SEGMENT_MODE = 0o600  # read-write for the receiver's OS user only


def segment_offsets(layout: KVLayout) -> tuple[list[tuple[int, int]], int]:
    """Byte offsets of each layer's (K, V) in the segment, and the segment's size."""
    step = -(-layout.tensor_bytes // ALIGN_BYTES) * ALIGN_BYTES
    offsets = [(2 * i * step, (2 * i + 1) * step) for i in range(layout.num_layers)]
    return offsets, 2 * layout.num_layers * step


def create_segment(name: str, size: int) -> mmap.mmap:
    """A new segment of ``size`` bytes, mode 0600, registered for crash cleanup, mapped as in map_segment."""
    if _posixshmem is None:
        raise TransferError("shared memory transport needs a POSIX system; use 'tcp'")
    # O_EXCL: never adopt a segment someone else created under this name
    fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=SEGMENT_MODE)
    try:
        os.fchmod(fd, SEGMENT_MODE)  # shm_open's mode passes through the umask; make it exact
        os.ftruncate(fd, size)
        resource_tracker.register("/" + name, "shared_memory")  # unlinks it if this process dies
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    except BaseException:
        unlink_segment(name)
        raise
    finally:
        os.close(fd)


def unlink_segment(name: str) -> None:
    """Remove a segment this process created (mappings stay valid until unmapped)."""
    if _posixshmem is None:
        return
    with contextlib.suppress(FileNotFoundError):
        _posixshmem.shm_unlink("/" + name)
    resource_tracker.unregister("/" + name, "shared_memory")


def map_segment(name: str, size: int) -> mmap.mmap:
    """Map an existing segment read-write with every page faulted in, without registering it anywhere."""
    if _posixshmem is None:
        raise TransferError("shared memory transport needs a POSIX system; use 'tcp'")
    try:
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    except FileNotFoundError:
        raise TransferError(f"shared-memory segment {name!r} does not exist (receiver gone?)") from None
    try:
        if os.fstat(fd).st_size < size:
            raise TransferError(f"shared-memory segment {name!r} is smaller than its layout needs ({size} B)")
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    finally:
        os.close(fd)


def _layer_views(buf: mmap.mmap, layout: KVLayout) -> list[tuple[np.ndarray, np.ndarray]]:
    """Numpy byte views ``[num_blocks, block_bytes]`` of each layer's K and V in a mapped segment."""
    offsets, _ = segment_offsets(layout)
    shape = (layout.num_blocks, layout.block_bytes)
    return [
        tuple(np.frombuffer(buf, np.uint8, layout.tensor_bytes, off).reshape(shape) for off in kv)  # type: ignore[misc]
        for kv in offsets
    ]


def unlink_stale_segments() -> list[str]:
    """Unlink pdserve segments in /dev/shm whose creating process no longer exists; returns their names."""
    removed: list[str] = []
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return removed
    for name in names:
        m = re.fullmatch(re.escape(SEGMENT_PREFIX) + r"(\d+)-[0-9a-f]+", name)
        if m is None:
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # creator alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        try:
            os.unlink(os.path.join("/dev/shm", name))
            removed.append(name)
        except OSError:
            pass
    return removed


class ShmReceiver(ZmqReceiver):
    """Receiver whose CPU cache lives in one shared-memory segment; also accepts tcp senders."""

    transport: ClassVar[str] = "shm"

    def _allocate(self) -> KVCaches:
        if self.device.type != "cpu":
            raise TransferError(f"shm receivers keep the KV cache in CPU shared memory, not on {self.device}")
        offsets, size = segment_offsets(self.layout)
        self._name = f"{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        self._buf: mmap.mmap | None = create_segment(self._name, size)
        shape = (self.layout.num_blocks, *self.layout.block_shape)
        dtype = self.layout.torch_dtype
        numel = self.layout.tensor_bytes // self.layout.torch_dtype.itemsize
        caches: KVCaches = []
        for k_off, v_off in offsets:
            k = torch.frombuffer(self._buf, dtype=dtype, count=numel, offset=k_off).view(shape)
            v = torch.frombuffer(self._buf, dtype=dtype, count=numel, offset=v_off).view(shape)
            caches.append((k, v))
        logger.info("KV cache in shared memory %s: %.1f MiB", self._name, size / 2**20)
        return caches

    def _shm_name(self) -> str | None:
        return self._name

    def _release(self) -> None:
        unlink_segment(self._name)
        super()._release()
        buf, self._buf = self._buf, None
        if buf is not None:
            try:
                buf.close()
            except BufferError:  # someone (e.g. a model runner) still holds a cache tensor
                logger.debug("shm %s stays mapped until its last tensor is released", self._name)


class _Attached:
    """A peer's mapped segment and views of each layer's K and V in it."""

    def __init__(self, name: str, layout: KVLayout, need_tensors: bool) -> None:
        _, size = segment_offsets(layout)
        self.buf: mmap.mmap | None = map_segment(name, size)
        self.views = _layer_views(self.buf, layout)
        self.tensors: KVCaches = []
        if need_tensors:  # only a CUDA source needs torch tensors over the segment
            shape = (layout.num_blocks, *layout.block_shape)
            self.tensors = [
                (torch.from_numpy(k).view(layout.torch_dtype).view(shape),
                 torch.from_numpy(v).view(layout.torch_dtype).view(shape))
                for k, v in self.views
            ]

    def close(self) -> None:
        self.tensors = []
        self.views = []
        buf, self.buf = self.buf, None
        if buf is not None:
            try:
                buf.close()
            except BufferError:
                logger.warning("shm mapping still referenced; it is released when the last view is")


class ShmSender(SenderBase):
    """Copies blocks straight into same-host receivers' shared-memory caches (synchronous)."""

    transport: ClassVar[str] = "shm"

    def __init__(
        self,
        local_kv_caches: KVCaches,
        *,
        send_timeout_s: float = 30.0,
        linger_s: float = 5.0,
        socket_buffer_bytes: int | None = None,  # the link carries only small done notices
    ) -> None:
        super().__init__(local_kv_caches)
        self._links = PushLinks(send_timeout_s, linger_s, socket_buffer_bytes)
        self._attached: dict[str, _Attached] = {}
        self._on_cpu = all(v is not None for v in self._views)

    def _open(self, peer_id: str, descriptor: KVDescriptor) -> None:
        require_token(peer_id, descriptor)
        if descriptor.shm_name is None:
            raise TransferError(f"peer {peer_id}: a {descriptor.transport!r} receiver has no shared memory")
        attached = _Attached(descriptor.shm_name, descriptor.layout, not self._on_cpu)
        try:
            self._links.open(peer_id, descriptor.endpoint)
        except Exception:
            attached.close()
            raise
        self._attached[peer_id] = attached

    def _close_peer(self, peer_id: str) -> None:
        self._links.close(peer_id)
        att = self._attached.pop(peer_id, None)
        if att is not None:
            att.close()

    def _put_blocks(self, peer_id: str, request_id: str, layer: int,
                    src_block_ids: list[int], dst_block_ids: list[int]) -> None:
        att = self._attached[peer_id]
        views = self._views[layer]
        if views is not None:
            runs = block_runs(src_block_ids, dst_block_ids)
            dst_k, dst_v = att.views[layer]
            copy_runs_np(views[0], dst_k, runs)
            copy_runs_np(views[1], dst_v, runs)
            return
        (k, v), (dst_k_t, dst_v_t) = self.kv_caches[layer], att.tensors[layer]
        copy_blocks(k, src_block_ids, dst_k_t, dst_block_ids)
        copy_blocks(v, src_block_ids, dst_v_t, dst_block_ids)

    def _put_done(self, peer_id: str, request_id: str, payload: bytes,
                  num_bytes: int, first_s: float | None) -> None:
        done = Done(self._peers[peer_id].token, request_id, payload, num_bytes, first_s, True)
        self._links.send(peer_id, [encoder.encode(done)])

    def _put_abort(self, peer_id: str, request_id: str, reason: str) -> None:
        self._links.send(peer_id, [encoder.encode(Abort(self._peers[peer_id].token, request_id, reason))])

    def _shutdown(self) -> None:
        self._links.shutdown()
