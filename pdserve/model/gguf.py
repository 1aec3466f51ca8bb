"""Weights of a GGUF file as Hugging Face-named fp32 tensors.

1. Each tensor of the file is dequantized to fp32 with the ``gguf`` package
   (one tensor at a time; the file stays memory-mapped).
2. Its llama.cpp name (``blk.3.attn_q.weight``) is mapped to the HF name
   (``model.layers.3.self_attn.q_proj.weight``) that
   :meth:`LlamaForCausalLM.load_weights` takes, so GGUF and safetensors
   checkpoints fill the model through the same checks.
3. llama.cpp's converter reorders the rows of the q and k projections of
   Llama models for its interleaved RoPE (pairs ``(2i, 2i+1)`` of each head);
   pdserve rotates halves (pairs ``(i, i + D/2)``) like HF, so those rows are
   put back: per head, the rows ``[r0 r1 ... ]`` stored as pairs are split into
   the even and the odd halves again.

Raises :class:`ModelLoadError` naming the tensor for an unsupported tensor
type or an unknown tensor.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import torch

from pdserve.errors import ModelLoadError, UnsupportedModelError
from pdserve.modelspec.arch import ArchConfig
from pdserve.modelspec.gguf_file import gguf_architecture, open_gguf

#: Tensor types pdserve dequantizes (all through the ``gguf`` package).
SUPPORTED_TENSOR_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """The HF name of a llama.cpp tensor name, or None for a name pdserve does not know."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head, interleaved pairs back to halves.

    ``weight`` is ``[num_heads * head_dim, ...]``; llama.cpp stored row
    ``2i + j`` of a head where HF has row ``j * head_dim / 2 + i``.
    """
    rows = weight.shape[0]
    head_dim = rows // num_heads
    rest = weight.shape[1:]
    return (
        weight.reshape(num_heads, head_dim // 2, 2, *rest)  # [H, D/2, 2, ...] as stored
        .transpose(1, 2)  # [H, 2, D/2, ...]: first the even rows, then the odd ones
        .reshape(rows, *rest)
    )


def dequantize(path: str, name: str, tensor_type: str, data: np.ndarray) -> np.ndarray:
    """fp32 values of one tensor's raw data (rows × columns in HF order).

    Raises:
        ModelLoadError: a tensor type outside :data:`SUPPORTED_TENSOR_TYPES`.
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    if tensor_type not in SUPPORTED_TENSOR_TYPES:
        raise ModelLoadError(
            f"{path}: tensor {name} has type {tensor_type}, which pdserve does not load; "
            f"supported: {', '.join(SUPPORTED_TENSOR_TYPES)}"
        )
    values = np.asarray(gguf_dequantize(data, GGMLQuantizationType[tensor_type]), dtype=np.float32)
    return values if values.flags.writeable else values.copy()  # F32 comes back as a view of the file


def gguf_weights(path: str, arch: ArchConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, fp32 CPU tensor) pairs of a GGUF file's weights, one tensor at a time.

    Raises:
        ModelLoadError: an unknown tensor, an unsupported tensor type, or a
            corrupt file.
        UnsupportedModelError: an architecture pdserve does not run.
    """
    reader = open_gguf(path)
    gguf_architecture(reader, path)
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            raise UnsupportedModelError(f"{path}: tensor {tensor.name} is unknown to pdserve's Llama model")
        values = dequantize(path, tensor.name, tensor.tensor_type.name, tensor.data)
        # GGUF lists dimensions fastest-first; HF shapes are the reverse.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        try:
            weight = torch.from_numpy(values.reshape(shape))
        except ValueError as e:
            raise ModelLoadError(f"{path}: tensor {tensor.name} has {values.size} values for {shape}") from e
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            weight = unpermute_rope_rows(weight, arch.num_heads)
        elif name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            weight = unpermute_rope_rows(weight, arch.num_kv_heads)
        yield name, weight
