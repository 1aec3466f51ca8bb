"""The KV link between a prefill and a decode worker: bytes / bandwidth + latency.

The real pusher (:class:`pdserve.worker.prefill.KVPusher`) sends each layer's
new blocks as soon as that layer of the step is computed, so the copy of
layer ``l`` overlaps with the compute of layers ``l+1 … L``. :class:`Link`
models one sender's outgoing queue (FIFO, one transfer at a time) with that
overlap in closed form: a step of duration ``T`` starting at ``t0`` hands the
link ``L`` equal pieces of ``s = bytes / L / bandwidth`` seconds, piece ``k``
ready at ``t0 + T·(k+1)/L``. The last piece leaves the FIFO at::

    max(free_at + L·s,  t0 + T/L + L·s,  t0 + T + s)

(the queue's own backlog; the link as the bottleneck from the first layer on;
compute as the bottleneck, only the last layer's copy exposed).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinkModel:
    """A link's bandwidth (bytes/s) and one-way latency (s)."""

    bandwidth_bytes_per_s: float
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.bandwidth_bytes_per_s > 0 or self.latency_s < 0:
            raise ValueError(
                f"link bandwidth must be > 0 and latency ≥ 0 (got {self.bandwidth_bytes_per_s}, "
                f"{self.latency_s})"
            )


class Link:
    """One sender's FIFO queue on a :class:`LinkModel`."""

    def __init__(self, model: LinkModel) -> None:
        self.model = model
        self.free_at_s = 0.0
        self.num_bytes = 0

    def push_layered(self, start_s: float, step_s: float, num_layers: int, num_bytes: int) -> float:
        """Queue the KV a step writes layer by layer; returns when its last byte has left."""
        if num_bytes <= 0:
            return max(self.free_at_s, start_s + step_s)
        piece_s = num_bytes / num_layers / self.model.bandwidth_bytes_per_s
        all_s = piece_s * num_layers
        self.free_at_s = max(self.free_at_s + all_s, start_s + step_s / num_layers + all_s,
                             start_s + step_s + piece_s)
        self.num_bytes += num_bytes
        return self.free_at_s

    def push(self, now_s: float, num_bytes: int) -> float:
        """Queue bytes that are all ready now (a late destination's catch-up)."""
        self.free_at_s = max(self.free_at_s, now_s) + num_bytes / self.model.bandwidth_bytes_per_s
        self.num_bytes += num_bytes
        return self.free_at_s
