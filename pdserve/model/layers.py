"""Building blocks of a Llama-family decoder: RMSNorm, RoPE and the SwiGLU MLP.

All numerics follow the reference Hugging Face implementations closely
enough that fp32 logits agree to ~1e-5: RMSNorm normalises in fp32, RoPE
angles are computed in fp32 and cast to the activation dtype, and RoPE
scaling derives its inverse frequencies with the same formulas.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, with a learned scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (self.dim,), self.weight, self.eps)
        # Reduced precision: normalise in fp32, round, then scale (as HF does).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies of RoPE, [head_dim // 2] fp32.

    ``linear`` divides every frequency by ``factor``. ``llama3`` keeps
    high frequencies (wavelength below ``original_max / high_freq_factor``),
    divides low ones (wavelength above ``original_max / low_freq_factor``) by
    ``factor``, and blends linearly in between.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)  # [D/2]
    rope_type = "default" if scaling is None else scaling["rope_type"]
    if rope_type == "default":
        return inv_freq
    assert scaling is not None
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "llama3":
        original = float(scaling["original_max_position_embeddings"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
        blend = (original / wavelength - low) / (high - low)
        blended = (1 - blend) * scaled / factor + blend * scaled
        in_between = (wavelength >= original / high) & (wavelength <= original / low)
        return torch.where(in_between, blended, scaled)
    raise ValueError(f"unknown rope_type {rope_type!r}")


class RotaryEmbedding(nn.Module):
    """RoPE with cos/sin tables precomputed for every position up to ``max_positions``.

    Uses the rotate-half layout (first half of a head paired with the
    second half), like HF Llama/Qwen checkpoints expect.
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self.scaling = scaling
        self.register_buffer("cos", torch.empty(max_positions, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim // 2), persistent=False)
        self.reset_tables()

    @torch.no_grad()
    def reset_tables(self) -> None:
        """(Re)compute the tables in fp32 on the buffers' device, then cast to their dtype.

        Needed after ``to_empty`` (which leaves buffers uninitialised).
        """
        if self.cos.is_meta:
            return
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling).to(self.cos.device)
        positions = torch.arange(self.max_positions, device=self.cos.device, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)  # [P, D/2]
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of ``positions`` [T], each [T, 1, D/2], ready for :func:`apply_rope`."""
        cos = self.cos.index_select(0, positions).to(dtype).unsqueeze(1)
        sin = self.sin.index_select(0, positions).to(dtype).unsqueeze(1)
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [T, heads, D] by the angles whose cos/sin are [T, 1, D/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class SwiGLUMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2I]
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate).mul_(up))  # [T, hidden]
