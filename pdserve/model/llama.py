"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over a paged KV cache.

One forward pass per engine step:

1. Embed the step's ``T`` tokens (all sequences' new tokens, concatenated).
2. Per layer: RMSNorm → fused QKV projection (Qwen2: with bias) → per-head
   q/k RMSNorm (Qwen3) → RoPE → write K/V into the cache → notify
   ``on_layer_done`` → paged attention (:mod:`pdserve.model.attention`) →
   output projection + residual → RMSNorm → SwiGLU MLP + residual.
3. Final RMSNorm; :meth:`LlamaForCausalLM.compute_logits` applies the LM
   head only to the rows the caller picks (usually each sequence's last).

Linear layers always see all ``T`` rows at once. Weights use fused
``qkv_proj`` and ``gate_up_proj`` matrices; :meth:`load_weights` takes the
checkpoint's separate HF tensors and copies them into their slices.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from pdserve.errors import ModelLoadError
from pdserve.model.attention import GatherWorkspace, KVCache, paged_attention, write_kv
from pdserve.model.attention_metadata import AttentionMetadata
from pdserve.model.layers import RMSNorm, RotaryEmbedding, SwiGLUMLP, apply_rope
from pdserve.modelspec.arch import ArchConfig

#: Checkpoint tensors that carry no weights (old checkpoints store RoPE tables).
_IGNORED_NAMES = re.compile(r".*rotary_emb\.inv_freq$")


@dataclass
class StepInputs:
    """Per-step inputs shared by every layer.

    Attributes:
        meta: the batch's attention metadata.
        cos, sin: RoPE tables of the step's positions, each [T, 1, D/2].
        workspace: the model's reusable gather buffers.
        on_layer_done: called with a layer's index once it wrote its K/V.
    """

    meta: AttentionMetadata
    cos: torch.Tensor
    sin: torch.Tensor
    workspace: GatherWorkspace
    on_layer_done: Callable[[int], None] | None


class LlamaAttention(nn.Module):
    """Grouped-query self-attention of one layer."""

    def __init__(self, arch: ArchConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = arch.num_heads
        self.num_kv_heads = arch.num_kv_heads
        self.head_dim = arch.head_dim
        self.scale = arch.head_dim**-0.5
        q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        self.qkv_proj = nn.Linear(arch.hidden_size, q_size + 2 * kv_size, bias=arch.attention_bias)
        self.o_proj = nn.Linear(q_size, arch.hidden_size, bias=arch.attention_out_bias)
        self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps) if arch.qk_norm else None
        self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps) if arch.qk_norm else None

    def forward(self, x: torch.Tensor, kv_cache: KVCache, step: StepInputs) -> torch.Tensor:
        """[T, hidden] normed input → [T, hidden] attention output."""
        num_tokens = x.shape[0]
        heads, kv_heads = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(num_tokens, heads + 2 * kv_heads, self.head_dim)
        v = qkv[:, heads + kv_heads :]  # [T, kvH, D]
        if self.q_norm is not None and self.k_norm is not None:
            q = apply_rope(self.q_norm(qkv[:, :heads]), step.cos, step.sin)  # [T, H, D]
            k = apply_rope(self.k_norm(qkv[:, heads : heads + kv_heads]), step.cos, step.sin)
        else:
            qk = apply_rope(qkv[:, : heads + kv_heads], step.cos, step.sin)  # q and k in one op
            q, k = qk[:, :heads], qk[:, heads:]  # [T, H, D], [T, kvH, D]
        write_kv(k, v, kv_cache, step.meta)
        if step.on_layer_done is not None:
            step.on_layer_done(self.layer_idx)
        out = paged_attention(q, k, v, kv_cache, step.meta, self.scale, step.workspace)
        return self.o_proj(out.view(num_tokens, heads * self.head_dim))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention block and MLP block, each with a residual."""

    def __init__(self, arch: ArchConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = LlamaAttention(arch, layer_idx)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = SwiGLUMLP(arch.hidden_size, arch.intermediate_size, arch.mlp_bias)

    def forward(self, hidden: torch.Tensor, kv_cache: KVCache, step: StepInputs) -> torch.Tensor:
        """[T, hidden] residual stream in and out."""
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), kv_cache, step)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, i) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """A Llama-family causal LM that reads and writes a paged KV cache.

    Parameters never require gradients: this is an inference engine.
    """

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.arch = arch
        self.model = LlamaModel(arch)
        self.rotary = RotaryEmbedding(
            arch.head_dim, arch.max_position_embeddings, arch.rope_theta, arch.rope_scaling
        )
        self.lm_head = (
            None if arch.tie_word_embeddings else nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        )
        self.workspace = GatherWorkspace()
        #: An int8 LM head set by :func:`pdserve.model.quant.quantize_model`; used instead of the weights.
        self.quantized_head: nn.Module | None = None
        self.requires_grad_(False)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] long
        positions: torch.Tensor,  # [T] long
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
        on_layer_done: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [T, hidden] of the step's tokens.

        ``on_layer_done(i)`` runs as soon as layer ``i`` has written its new
        K/V into ``kv_caches[i]`` (before that layer's attention). On CUDA
        the write is only enqueued by then: record an event on the current
        stream before reading the cache from elsewhere.
        """
        hidden = self.model.embed_tokens(input_ids)  # [T, hidden]
        cos, sin = self.rotary.tables(positions, hidden.dtype)
        step = StepInputs(meta, cos, sin, self.workspace, on_layer_done)
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            hidden = layer(hidden, kv_cache, step)
        return self.model.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] in fp32 of hidden states [N, hidden]."""
        if self.quantized_head is not None:
            return self.quantized_head(hidden).float()
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return torch.nn.functional.linear(hidden, weight).float()

    def hf_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every HF checkpoint tensor this model needs, with its shape, in a fixed order."""
        return {name: tuple(t.shape) for name, t in self._weight_targets().items()}

    def _weight_targets(self) -> dict[str, torch.Tensor]:
        """HF tensor name → the parameter (or slice of a fused one) it fills."""
        arch = self.arch
        q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        targets: dict[str, torch.Tensor] = {"model.embed_tokens.weight": self.model.embed_tokens.weight}
        for i, layer in enumerate(self.model.layers):
            assert isinstance(layer, LlamaDecoderLayer)
            prefix = f"model.layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            kinds = ["weight"] + (["bias"] if arch.attention_bias else [])
            for kind in kinds:
                fused = getattr(attn.qkv_proj, kind)
                targets[f"{prefix}self_attn.q_proj.{kind}"] = fused[:q_size]
                targets[f"{prefix}self_attn.k_proj.{kind}"] = fused[q_size : q_size + kv_size]
                targets[f"{prefix}self_attn.v_proj.{kind}"] = fused[q_size + kv_size :]
            targets[f"{prefix}self_attn.o_proj.weight"] = attn.o_proj.weight
            if attn.o_proj.bias is not None:
                targets[f"{prefix}self_attn.o_proj.bias"] = attn.o_proj.bias
            if attn.q_norm is not None and attn.k_norm is not None:
                targets[f"{prefix}self_attn.q_norm.weight"] = attn.q_norm.weight
                targets[f"{prefix}self_attn.k_norm.weight"] = attn.k_norm.weight
            inter = arch.intermediate_size
            for kind in ["weight"] + (["bias"] if arch.mlp_bias else []):
                fused = getattr(mlp.gate_up_proj, kind)
                targets[f"{prefix}mlp.gate_proj.{kind}"] = fused[:inter]
                targets[f"{prefix}mlp.up_proj.{kind}"] = fused[inter:]
                targets[f"{prefix}mlp.down_proj.{kind}"] = getattr(mlp.down_proj, kind)
            targets[f"{prefix}input_layernorm.weight"] = layer.input_layernorm.weight
            targets[f"{prefix}post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        targets["model.norm.weight"] = self.model.norm.weight
        if self.lm_head is not None:
            targets["lm_head.weight"] = self.lm_head.weight
        return targets

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named checkpoint tensors into the model (casting dtype and device).

        With tied embeddings a stored ``lm_head.weight`` is ignored, as HF does.

        Raises:
            ModelLoadError: an unknown tensor name, a shape mismatch, or
                tensors the model needs that never came.
        """
        targets = self._weight_targets()
        loaded: set[str] = set()
        unknown: list[str] = []
        for name, tensor in weights:
            target = targets.get(name)
            if target is None:
                tied_head = name == "lm_head.weight" and self.lm_head is None
                if not (tied_head or _IGNORED_NAMES.match(name)):
                    unknown.append(name)
                continue
            if tuple(tensor.shape) != tuple(target.shape):
                raise ModelLoadError(
                    f"tensor {name} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}"
                )
            target.copy_(tensor)
            loaded.add(name)
        if unknown:
            raise ModelLoadError(
                f"{len(unknown)} checkpoint tensors unknown to {self.arch.architecture}: "
                + _name_list(unknown)
            )
        missing = [name for name in targets if name not in loaded]
        if missing:
            raise ModelLoadError(f"{len(missing)} tensors missing from checkpoint: " + _name_list(missing))

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (RoPE tables), e.g. after ``to_empty``."""
        self.rotary.reset_tables()


def _name_list(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
