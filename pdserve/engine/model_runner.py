"""Runs one scheduled step on the model: builds inputs, runs the forward pass, samples.

The runner owns the KV-cache tensors (one K and one V tensor per layer, each
``[num_blocks, block_size, num_kv_heads, head_dim]``) that the block
manager's ids index, the model's weights and the sampler.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from pdserve.config import CacheConfig, ModelConfig
from pdserve.engine.sampler import SampledToken, Sampler
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.model.attention import KVCache, allocate_kv_cache
from pdserve.model.attention_metadata import SeqSpec, build_attention_metadata
from pdserve.model.llama import LlamaForCausalLM
from pdserve.model.loader import load_model, resolve_device, resolve_dtype
from pdserve.model.quant import quantize_model
from pdserve.modelspec.arch import ArchConfig
from pdserve.request import Request

logger = logging.getLogger(__name__)

KVAllocator = Callable[[int, int, int, int, int, torch.dtype, torch.device], list[KVCache]]


def kv_bytes_per_block(arch: ArchConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of K and V over all layers for one block."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * arch.num_layers * block_size * arch.num_kv_heads * arch.head_dim * itemsize


class ModelRunner:
    """Owns weights, KV cache and sampler; ``execute`` runs one step.

    ``model``: weights already loaded (by an earlier runner of the same model and
    dtype); default: load them.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        arch: ArchConfig,
        kv_allocator: KVAllocator | None = None,
        model: LlamaForCausalLM | None = None,
        calibration_ids: list[int] | None = None,
    ) -> None:
        self.arch = arch
        self.device = resolve_device(model_config.device)
        self.dtype = resolve_dtype(model_config.dtype)
        self.block_size = cache_config.block_size
        # A worker that changes role passes the weights it already has (no reload; already quantized).
        if model is None:
            model = load_model(model_config.model, arch, self.dtype, self.device, model_config.seed)
            quantize_model(model, model_config.quantization, calibration_ids)
        self.model = model
        per_block = kv_bytes_per_block(arch, self.block_size, self.dtype)
        self.num_blocks = cache_config.num_blocks or max(cache_config.kv_cache_bytes // per_block, 1)
        allocate = kv_allocator or allocate_kv_cache
        self.kv_caches: list[KVCache] = allocate(
            arch.num_layers, self.num_blocks, self.block_size, arch.num_kv_heads,
            arch.head_dim, self.dtype, self.device,
        )
        self.sampler = Sampler(seed=model_config.seed)
        logger.info(
            "model runner: %s on %s/%s, %d KV blocks of %d tokens (%.1f MiB)",
            model_config.model, self.device, self.dtype, self.num_blocks, self.block_size,
            self.num_blocks * per_block / 2**20,
        )

    @torch.inference_mode()
    def execute(
        self, out: SchedulerOutput, on_layer_done: Callable[[int], None] | None = None
    ) -> list[SampledToken | None]:
        """Run one step; returns a sampled token for each request that reached its end."""
        input_ids: list[int] = []
        positions: list[int] = []
        specs: list[SeqSpec] = []
        sample_rows: list[int] = []
        sample_requests: list[Request] = []
        for item in out.scheduled:
            request, start, num_new = item.request, item.num_computed_tokens, item.num_new_tokens
            input_ids.extend(request.all_token_ids[start : start + num_new])
            positions.extend(range(start, start + num_new))
            specs.append(SeqSpec(start, num_new, item.block_ids))
            if item.samples:
                sample_rows.append(len(input_ids) - 1)
                sample_requests.append(request)
        device = self.device
        meta = build_attention_metadata(specs, self.block_size, device)
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.long, device=device),
            torch.tensor(positions, dtype=torch.long, device=device),
            self.kv_caches, meta, on_layer_done,
        )
        results: list[SampledToken | None] = [None] * len(out.scheduled)
        if not sample_requests:
            return results
        rows = torch.tensor(sample_rows, dtype=torch.long, device=device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))  # [N, vocab]
        sampled = iter(self.sampler(logits, sample_requests))
        for i, item in enumerate(out.scheduled):
            if item.samples:
                results[i] = next(sampled)
        return results
