"""Roofline step times for a model on an accelerator (TP degree ``tp``), with stated efficiencies.

One step of shape :class:`StepShape` on one worker of ``tp`` accelerators::

    flops   = 2 · P_dense · tokens                     (every weight matrix, each token)
            + 2 · hidden · vocab · sampled             (LM head, sampled rows only)
            + 4 · layers · heads · head_dim · (prefill_pairs + decode_context)   (QKᵀ and PV)
    bytes   = weight_bytes                              (all weights read once per step)
            + kv_bytes_per_token · (decode_context + prefill_context + tokens)  (KV read + written)
    t       = max(flops / (tp · peak · compute_eff), bytes / (tp · mem_bw · mem_eff))
            + tp_comm + overhead
    tp_comm = 2 · layers · (2·(tp−1)/tp · tokens · hidden · act_bytes / intra_bw + allreduce_latency)

Efficiencies (:class:`Efficiency`) are assumptions, not measurements: 60% of
dense peak for GEMMs, 80% of memory bandwidth, 10 µs per all-reduce, 1.5 ms
of per-step overhead (scheduling, sampling, kernel launches with CUDA
graphs). ``docs/cost.md`` says what this leaves out.

KV capacity: ``0.9 · tp · memory − weights − 2 GiB · tp`` (activations, CUDA
context), in blocks of ``block_size`` tokens at 2 bytes per element (bf16 KV).
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.errors import ConfigError
from pdserve.modelspec.arch import ArchConfig
from pdserve.sim.hardware import Accelerator
from pdserve.sim.link import LinkModel
from pdserve.sim.step_model import StepShape

KV_DTYPE_BYTES = 2
ACT_BYTES = 2
GIB = 2**30


@dataclass(frozen=True)
class Efficiency:
    """Fractions of the datasheet peaks reached, and fixed costs (seconds)."""

    compute: float = 0.6
    memory: float = 0.8
    allreduce_latency_s: float = 10e-6
    step_overhead_s: float = 1.5e-3
    memory_utilization: float = 0.9
    reserved_bytes_per_accel: float = 2 * GIB


@dataclass(frozen=True)
class RooflineStepModel:
    """A :class:`StepModel` from a model's shape and an accelerator's datasheet."""

    arch: ArchConfig
    accel: Accelerator
    tp: int = 1
    precision: str = "bf16"
    eff: Efficiency = Efficiency()

    def __post_init__(self) -> None:
        self.accel.check_tp(self.tp)
        self.accel.peak_flops(self.precision)  # refuses fp8 where there is none

    @property
    def weight_bytes(self) -> float:
        """Bytes of all weights (fp8 weights: 1 byte each, else 2)."""
        return self.arch.num_params() * (1 if self.precision == "fp8" else 2)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V of one token over all layers (bf16 KV)."""
        return self.arch.kv_bytes_per_token(KV_DTYPE_BYTES)

    def num_kv_blocks(self, block_size: int) -> int:
        """KV blocks that fit next to the weights; refuses a model that does not fit."""
        e = self.eff
        free = e.memory_utilization * self.tp * self.accel.mem_bytes - self.weight_bytes \
            - e.reserved_bytes_per_accel * self.tp
        per_block = self.kv_bytes_per_token * block_size
        if free < per_block * 64:
            need = (self.weight_bytes + e.reserved_bytes_per_accel * self.tp) / e.memory_utilization / GIB
            raise ConfigError(
                f"{self.arch.num_params() / 1e9:.1f}B parameters do not fit {self.tp} × {self.accel.key} "
                f"({self.tp * self.accel.mem_bytes / GIB:.0f} GiB; about {need:.0f} GiB needed with room "
                f"for KV): raise --tp"
            )
        return int(free // per_block)

    def step_time_s(self, shape: StepShape) -> float:
        """Predicted step time (see the module docstring)."""
        a = self.arch
        dense_params = a.num_params() - a.vocab_size * a.hidden_size * (1 if a.tie_word_embeddings else 2)
        flops = 2.0 * dense_params * shape.num_tokens + 2.0 * a.hidden_size * a.vocab_size * shape.num_sampled
        flops += 4.0 * a.num_layers * a.num_heads * a.head_dim * (shape.prefill_pairs + shape.decode_context)
        kv_tokens = shape.decode_context + shape.prefill_context + shape.num_tokens
        num_bytes = self.weight_bytes + self.kv_bytes_per_token * kv_tokens
        e = self.eff
        t = max(flops / (self.tp * self.accel.peak_flops(self.precision) * e.compute),
                num_bytes / (self.tp * self.accel.mem_bytes_per_s * e.memory))
        if self.tp > 1:
            assert self.accel.intra_node_bytes_per_s is not None
            per_allreduce = 2 * (self.tp - 1) / self.tp * shape.num_tokens * a.hidden_size * ACT_BYTES
            intra = self.accel.intra_node_bytes_per_s
            t += 2 * a.num_layers * (per_allreduce / intra + e.allreduce_latency_s)
        return t + e.step_overhead_s

    def price_per_hour(self) -> float:
        """USD per hour of one worker (``tp`` accelerators)."""
        return self.tp * self.accel.price_per_hour


def kv_link(prefill: RooflineStepModel, decode: RooflineStepModel, latency_s: float = 20e-6) -> LinkModel:
    """The P→D KV link across nodes: the slower side's scale-out network (all of a worker's NICs)."""
    if prefill.arch != decode.arch:
        raise ConfigError("prefill and decode pools must serve the same model")
    bandwidth = min(prefill.accel.network_bytes_per_s * prefill.tp,
                    decode.accel.network_bytes_per_s * decode.tp)
    return LinkModel(bandwidth, latency_s)
