"""What a worker builds for its role: the engine and, by role, its KV sending or receiving side.

* ``prefill``: an engine and a :class:`KVPusher` over a :class:`KVSender` that
  reads the engine's own cache;
* ``decode``: an engine whose cache the :class:`KVReceiver` allocates (so that
  prefill workers can write into it) and a :class:`KVIntake`;
* ``mixed``: both sides over one cache: the receiver allocates it (other
  workers can write into it, as into a decode worker's) and a sender reads it
  (it can push a prompt it computed to another worker, as a prefill worker
  does). Besides its own whole requests, a mixed worker can so be the
  prefill side or the decode side of a hand-off.

A role flip (``protocol.Flip``) closes the old parts and builds new ones with
the weights already in memory: the KV cache and the transfer side are made
afresh, the model is not loaded again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from pdserve.config import Role
from pdserve.engine.engine import LLMEngine
from pdserve.model.attention import KVCache
from pdserve.model.llama import LlamaForCausalLM
from pdserve.transfer.base import KVReceiver, KVSender, make_receiver, make_sender
from pdserve.transfer.descriptor import KVLayout
from pdserve.worker.config import WorkerConfig
from pdserve.worker.decode import KVIntake
from pdserve.worker.prefill import KVPusher

RECEIVING_ROLES = (Role.DECODE, Role.MIXED)  # their cache is the receiver's (others write into it)
SENDING_ROLES = (Role.PREFILL, Role.MIXED)  # they push the KV of prompts they compute


@dataclass
class RoleParts:
    """A worker's engine and the transfer side its role needs."""

    role: Role
    engine: LLMEngine
    receiver: KVReceiver | None = None
    sender: KVSender | None = None
    intake: KVIntake | None = None
    pusher: KVPusher | None = None

    def close(self) -> None:
        """Close the transfer side (a receiver's shared-memory segment is unlinked here)."""
        if self.sender is not None:
            self.sender.close()
        if self.receiver is not None:
            self.receiver.close()


def build_role(config: WorkerConfig, role: Role, model: LlamaForCausalLM | None = None) -> RoleParts:
    """Engine and transfer side for ``role``; ``model``: weights to reuse (default: load them)."""
    engine_config = dataclasses.replace(
        config.engine, scheduler=dataclasses.replace(config.engine.scheduler, role=role)
    )
    receivers: list[KVReceiver] = []

    def allocate(
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> list[KVCache]:
        """The receiver owns the worker's KV tensors."""
        dtype_name = str(dtype).removeprefix("torch.")
        layout = KVLayout(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype_name)
        options = {"advertise_host": config.kv_advertise_host} if config.kv_advertise_host else {}
        receiver = make_receiver(config.kv_transport or "auto", layout, device, bind_host=config.kv_host,
                                 **options)
        receivers.append(receiver)
        return receiver.kv_caches

    engine = LLMEngine(engine_config, kv_allocator=allocate if role in RECEIVING_ROLES else None,
                       detokenize=False, model=model, record_kv_events=True)
    parts = RoleParts(role, engine)
    if receivers:
        parts.receiver = receivers[0]
        parts.intake = KVIntake(engine, receivers[0])
    if role in SENDING_ROLES:
        # A mixed worker's sender reads the cache its receiver allocated: one cache, both directions.
        parts.sender = make_sender(engine.runner.kv_caches, override=config.kv_transport)
        parts.pusher = KVPusher(engine, parts.sender, drop_done=config.inject_fault == "drop-kv-done")
    return parts
