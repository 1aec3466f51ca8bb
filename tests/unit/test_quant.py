"""Int8 linear layers: per-layer error bounds, batch independence, and the quantized model."""

from __future__ import annotations

import pytest
import torch

from pdserve.errors import ConfigError
from pdserve.model import SeqSpec, allocate_kv_cache, build_attention_metadata, load_model
from pdserve.model.quant import Int8Linear, check_quantization, quantize_int8, quantize_model
from pdserve.modelspec import load_arch_config

CPU = torch.device("cpu")


def layer_inputs(seed: int, rows: int = 9, k: int = 576, n: int = 320) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) / k**0.5
    x = torch.randn(rows, k, generator=gen) * torch.logspace(-2, 2, rows)[:, None]  # rows of all sizes
    x[0, 3] = 40.0  # an outlier in one row
    return weight, x


def test_weight_rounding_is_within_half_a_step() -> None:
    weight, _ = layer_inputs(0)
    q, scales = quantize_int8(weight)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    error = (q.float() * scales[:, None] - weight).abs()
    assert (error <= scales[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("kernel", ["default", "weight-only"])
def test_layer_output_is_within_its_error_bound(kernel: str) -> None:
    weight, x = layer_inputs(1)
    bias = torch.randn(weight.shape[0])
    layer = Int8Linear(weight, bias)
    if kernel == "weight-only":
        layer._packed = None
    q, scales = quantize_int8(weight)
    expected = x @ weight.t() + bias
    # weights: each off by at most scale/2; activations (8-bit kernel): each off by at most
    # half a step of its row's range [-max|x|, max|x|], i.e. max|x| / 255
    bound = x.abs() @ (scales[:, None] / 2).expand_as(weight).t()
    if layer.kernel == "x86-int8-gemm":
        row_step = x.abs().amax(dim=1, keepdim=True) / 255
        bound = bound + row_step * (q.float().abs() * scales[:, None]).sum(dim=1)
    got = layer(x)
    assert ((got - expected).abs() <= bound * 1.001 + 1e-4).all()
    relative = ((got - expected).norm(dim=1) / expected.norm(dim=1)).max()
    assert relative < 0.03


def test_a_row_gives_the_same_result_alone_and_in_any_batch() -> None:
    weight, x = layer_inputs(2)
    layer = Int8Linear(weight, None)
    batch = layer(x)
    for i in range(x.shape[0]):
        torch.testing.assert_close(layer(x[i : i + 1])[0], batch[i], atol=0, rtol=0)
    torch.testing.assert_close(layer(x.flip(0)).flip(0), batch, atol=0, rtol=0)


def test_unknown_method_lists_the_known_ones() -> None:
    assert check_quantization("int8") == "int8"
    with pytest.raises(ConfigError, match=r"'int4' is not one of none, int8"):
        check_quantization("int4")


@torch.no_grad()
def test_quantized_tiny_model_stays_close_to_fp32() -> None:
    arch = load_arch_config("tiny")
    fp32 = load_model("tiny", arch, torch.float32, CPU)
    int8 = load_model("tiny", arch, torch.float32, CPU)
    quantize_model(int8, "int8")
    assert isinstance(int8.model.layers[0].self_attn.qkv_proj, Int8Linear)
    assert int8.quantized_head is not None
    ids = torch.tensor(list(range(5, 69)))
    logits = []
    for net in (fp32, int8):
        cache = allocate_kv_cache(
            arch.num_layers, 4, 16, arch.num_kv_heads, arch.head_dim, torch.float32, CPU
        )
        meta = build_attention_metadata([SeqSpec(0, len(ids), [0, 1, 2, 3])], 16, CPU)
        logits.append(net.compute_logits(net(ids, torch.arange(len(ids)), cache, meta)))
    ref, got = logits
    assert not torch.equal(ref, got)  # the quantized path really ran
    assert ((got - ref).norm(dim=1) / ref.norm(dim=1)).max() < 0.1  # 4 layers of 8-bit rounding
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.9


def test_engine_and_cli_take_the_option() -> None:
    from pdserve.cli import _build_parser, engine_options
    from pdserve.engine.llm import make_engine_config

    parser, _ = _build_parser()
    args = parser.parse_args(["worker", "--role", "decode", "--quantization", "int8"])
    assert make_engine_config("tiny", **engine_options(args)).model.quantization == "int8"
    with pytest.raises(ConfigError, match=r"quantization='int4' is not one of none, int8"):
        make_engine_config("tiny", quantization="int4")
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--quantization", "int4"])


@torch.no_grad()
def test_smoothing_keeps_the_function_and_flattens_the_activations() -> None:
    from pdserve.model.smooth import smooth_for_int8

    arch = load_arch_config("tiny")
    ids = torch.tensor(list(range(40, 104)))

    def run(net: torch.nn.Module, head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = allocate_kv_cache(
            arch.num_layers, 4, 16, arch.num_kv_heads, arch.head_dim, torch.float32, CPU
        )
        meta = build_attention_metadata([SeqSpec(0, len(ids), [0, 1, 2, 3])], 16, CPU)
        seen: list[torch.Tensor] = []
        hook = net.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
        hidden = net(ids, torch.arange(len(ids)), cache, meta)
        hook.remove()
        return torch.nn.functional.linear(hidden, head), seen[0]

    plain = load_model("tiny", arch, torch.float32, CPU)
    ref, ref_act = run(plain, plain.model.embed_tokens.weight)
    smoothed = load_model("tiny", arch, torch.float32, CPU)
    head = smooth_for_int8(smoothed, list(range(3, 200)))
    got, act = run(smoothed, head)
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)  # the same function
    torch.testing.assert_close(smoothed.model.embed_tokens.weight, plain.model.embed_tokens.weight)

    def spread(x: torch.Tensor) -> float:  # largest channel over the typical one
        per_channel = x.abs().amax(dim=0)
        return float(per_channel.max() / per_channel.median())

    assert spread(act) < spread(ref_act)
