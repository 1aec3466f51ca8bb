"""Int8 weights for the linear layers (``--quantization int8``).

Decode on a CPU is bound by the bytes of weights read per step; int8 reads a
quarter of fp32's. What happens at load time and per step:

0. Optionally (the engine always does) the activations are smoothed first:
   per-channel scales move input outliers into the weights, folded into the
   preceding norms and projections (:mod:`pdserve.model.smooth`).
1. :func:`quantize_int8` rounds each weight row (output channel) to int8 with
   one fp32 scale per row: ``scale = max|w_row| / 127`` (symmetric, so the
   rounding error of a weight is at most ``scale / 2``).
2. :func:`quantize_model` replaces the attention (fused QKV, output) and MLP
   (fused gate/up, down) projections of every layer and the LM head (a
   separate int8 copy when the head is tied to the embedding, whose lookup
   stays in the model's dtype) with :class:`Int8Linear`. Norms, RoPE and
   attention keep the model's dtype.
3. :class:`Int8Linear` runs on the kernel the device has:

   - CPU with PyTorch's x86/fbgemm int8 GEMM: each input row is scaled to
     ``max|x_row| = 1`` and quantized to 8 bits with a *fixed* scale, the
     GEMM accumulates in int32, and the output row is scaled back. The
     activation quantization depends on the row alone, so a request's
     result does not depend on what else is in the batch (the same tokens
     whether it decodes alone or among 16). PyTorch's weight-only CPU
     kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) were
     measured 5-20× slower than fp32 ``F.linear`` on this project's AVX2
     CPUs, so they are not used there (see docs/models.md).
   - elsewhere (CUDA, or a CPU build without the x86 engine): weight-only
     ``torch.ops.aten._weight_int8pack_mm`` (fp activations, int8 weights).

GGUF weights arrive dequantized to fp32 and are requantized here per channel
(a Q8_0 or Q4 block scale covers 32 values of a row, not the whole row).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pdserve.config import QUANTIZATION_METHODS
from pdserve.errors import ConfigError

logger = logging.getLogger(__name__)

_ACT_SCALE = 1.0 / 127.5  # 8-bit activations over [-1, 1] (uint8, zero point 128)
_ACT_ZERO_POINT = 128


def check_quantization(method: str) -> str:
    """``method`` if it is one of :data:`QUANTIZATION_METHODS`.

    Raises:
        ConfigError: any other value.
    """
    if method not in QUANTIZATION_METHODS:
        raise ConfigError(f"quantization={method!r} is not one of {', '.join(QUANTIZATION_METHODS)}")
    return method


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: ``(q [N, K] int8, scales [N] fp32)``, ``w ≈ q * scales[:, None]``.

    The rounding error of each weight is at most half its row's scale.
    """
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp_(min=1e-12)  # [N]
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def _cpu_int8_gemm_available() -> bool:
    engines = torch.backends.quantized.supported_engines
    return ("x86" in engines or "fbgemm" in engines) and hasattr(
        torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32"
    )


class Int8Linear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` stored as int8 and one fp32 scale per output channel.

    Attributes:
        in_features, out_features: the shape of ``W`` as in :class:`nn.Linear`.
        qweight: [out, in] int8.
        scales: [out] fp32.
        bias: [out] in the model's dtype, or None.
    """

    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q, scales = quantize_int8(weight)
        self.register_buffer("qweight", q.to(weight.device))
        self.register_buffer("scales", scales.to(weight.device))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._packed: Any = None
        if weight.device.type == "cpu" and _cpu_int8_gemm_available():
            with warnings.catch_warnings():  # quantized tensors are deprecated; only the packing uses one
                warnings.simplefilter("ignore", UserWarning)
                qw = torch._make_per_channel_quantized_tensor(
                    q, scales.double(), torch.zeros(self.out_features, dtype=torch.int64), 0
                )
            self._packed = torch.ops.quantized.linear_prepack(qw, None)

    @property
    def kernel(self) -> str:
        """Which kernel :meth:`forward` uses: ``x86-int8-gemm`` or ``int8-weight-only``."""
        return "x86-int8-gemm" if self._packed is not None else "int8-weight-only"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[T, in] → [T, out] in the dtype of ``x``."""
        if self._packed is not None:
            xf = x.float()
            row_max = xf.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-30)  # [T, 1]
            y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                xf / row_max, _ACT_SCALE, _ACT_ZERO_POINT, self._packed
            )
            y = y.mul_(row_max).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales.to(x.dtype))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}"


def _quantize_linear(linear: nn.Module) -> Int8Linear:
    assert isinstance(linear, nn.Linear)
    return Int8Linear(linear.weight, linear.bias)


@torch.no_grad()
def quantize_model(net: nn.Module, method: str, calibration_ids: Sequence[int] | None = None) -> None:
    """Replace ``net``'s projection layers and LM head by int8 ones (``method="int8"``), in place.

    With ``calibration_ids`` (token ids of some ordinary text, e.g. of
    :data:`pdserve.model.smooth.CALIBRATION_TEXT`) the activations are
    smoothed first (:mod:`pdserve.model.smooth`), which keeps int8 closer to
    the fp model.
    """
    if check_quantization(method) == "none":
        return
    from pdserve.model.llama import LlamaDecoderLayer, LlamaForCausalLM
    from pdserve.model.smooth import smooth_for_int8

    assert isinstance(net, LlamaForCausalLM)
    head = net.model.embed_tokens.weight if net.lm_head is None else net.lm_head.weight
    if calibration_ids:
        head = smooth_for_int8(net, calibration_ids)
    for layer in net.model.layers:
        assert isinstance(layer, LlamaDecoderLayer)
        for owner, name in (
            (layer.self_attn, "qkv_proj"),
            (layer.self_attn, "o_proj"),
            (layer.mlp, "gate_up_proj"),
            (layer.mlp, "down_proj"),
        ):
            setattr(owner, name, _quantize_linear(getattr(owner, name)))
    net.quantized_head = Int8Linear(head, None)
    logger.info("quantized linear layers and LM head to int8 (kernel %s)", net.quantized_head.kernel)
