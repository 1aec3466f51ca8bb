"""Activation smoothing before int8 quantization (the SmoothQuant idea), folded into the weights.

The int8 kernel quantizes each input row to 8 bits with one scale, so a few
input channels with large values (outliers) cost every other channel its
precision. Dividing input channel ``k`` by ``s_k`` and multiplying column
``k`` of the weight by ``s_k`` leaves ``x Wᵀ`` unchanged and moves the
outliers into the weights, which are quantized per output row and mind them
less. With ``s_k = max|x_k|^α / max|W[:, k]|^(1-α)`` (α = 0.5) both sides
end up with similar ranges.

1. :func:`smooth_for_int8` runs the fp model once over a few hundred tokens
   of calibration text and records each channel's ``max|x_k|`` at the
   inputs of the fused QKV, the fused gate/up and the down projections and of
   the LM head.
2. It folds ``1 / s`` into whatever produces those inputs, so that no extra
   operation runs per step: the RMSNorm scales in front of QKV, gate/up and
   the head, and the rows of the *up* projection in front of down
   (``silu(gate) * up`` is linear in ``up``). The o projection (its input is
   a sum over attention heads) is left as it is.
3. The model computes the same function as before (up to float rounding);
   it returns the smoothed LM-head weight for the quantizer (a tied head keeps
   the embedding untouched).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pdserve.model.attention import allocate_kv_cache
from pdserve.model.attention_metadata import SeqSpec, build_attention_metadata
from pdserve.model.llama import LlamaDecoderLayer, LlamaForCausalLM

ALPHA = 0.5
#: Calibration text: ordinary prose, a dialogue, code and numbers (tokenized by the engine).
CALIBRATION_TEXT = (
    "The history of the city goes back more than two thousand years. Its old town, with narrow streets "
    "and a cathedral, sits on a bend of the river; the modern districts grew around the railway station "
    "in the nineteenth century.\nUser: What is the capital of France, and why is it famous?\n"
    "Assistant: The capital of France is Paris. It is known for the Eiffel Tower, the Louvre museum, "
    "its cafés and its long history as a centre of art, science and politics.\n"
    "def mean(values):\n    return sum(values) / len(values)\n\nprint(mean([3, 5, 8, 13]))  # 7.25\n"
    "In 2023 the population was about 2.1 million; the wider region has over 12 million people."
)


class _AbsMax:
    """Per-channel ``max|x|`` of the tensors it sees."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        current = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        self.value = current if self.value is None else torch.maximum(self.value, current)


def _scales(act_max: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``s_k`` for input channels of ``weight`` [N, K] given ``max|x_k|`` [K]."""
    w_max = weight.detach().abs().amax(dim=0).float().clamp(min=1e-8)
    return (act_max.clamp(min=1e-5).pow(ALPHA) / w_max.pow(1 - ALPHA)).clamp(min=1e-5)


@torch.no_grad()
def smooth_for_int8(net: LlamaForCausalLM, calibration_ids: Sequence[int]) -> torch.Tensor:
    """Smooth ``net`` in place (same function, flatter activations); returns the head weight to quantize."""
    arch = net.arch
    device = net.model.embed_tokens.weight.device
    stats: dict[str, _AbsMax] = {}
    hooks = []

    def watch(module: nn.Module, key: str, output: bool = False) -> None:
        stats[key] = _AbsMax()
        if output:
            hooks.append(module.register_forward_hook(lambda _m, _i, out: stats[key].update(out)))
        else:
            hooks.append(module.register_forward_pre_hook(lambda _m, args: stats[key].update(args[0])))

    layers = [layer for layer in net.model.layers if isinstance(layer, LlamaDecoderLayer)]
    for i, layer in enumerate(layers):
        watch(layer.self_attn.qkv_proj, f"{i}.qkv")
        watch(layer.mlp.gate_up_proj, f"{i}.gate_up")
        watch(layer.mlp.down_proj, f"{i}.down")
    watch(net.model.norm, "head", output=True)
    ids = list(calibration_ids)[: arch.max_position_embeddings]
    block_size = 16
    blocks = list(range(-(-len(ids) // block_size)))
    cache = allocate_kv_cache(
        arch.num_layers, len(blocks), block_size, arch.num_kv_heads, arch.head_dim,
        net.model.norm.weight.dtype, device,
    )  # fmt: skip
    meta = build_attention_metadata([SeqSpec(0, len(ids), blocks)], block_size, device)
    try:
        net(torch.tensor(ids, device=device), torch.arange(len(ids), device=device), cache, meta)
    finally:
        for hook in hooks:
            hook.remove()

    def scale_columns(linear: nn.Module, key: str) -> torch.Tensor:
        act_max = stats[key].value
        assert isinstance(linear, nn.Linear) and act_max is not None
        s = _scales(act_max, linear.weight).to(linear.weight.dtype)
        linear.weight.mul_(s)  # [N, K] * [K]
        return s

    inter = arch.intermediate_size
    for i, layer in enumerate(layers):
        layer.input_layernorm.weight.div_(scale_columns(layer.self_attn.qkv_proj, f"{i}.qkv"))
        layer.post_attention_layernorm.weight.div_(scale_columns(layer.mlp.gate_up_proj, f"{i}.gate_up"))
        s_down = scale_columns(layer.mlp.down_proj, f"{i}.down")
        gate_up = layer.mlp.gate_up_proj
        gate_up.weight[inter:].div_(s_down[:, None])  # the up rows
        if gate_up.bias is not None:
            gate_up.bias[inter:].div_(s_down)
    head = net.model.embed_tokens.weight if net.lm_head is None else net.lm_head.weight
    head_max = stats["head"].value
    assert head_max is not None
    s_head = _scales(head_max, head).to(head.dtype)
    net.model.norm.weight.div_(s_head)
    return head * s_head  # a new tensor: a tied embedding stays as it is
