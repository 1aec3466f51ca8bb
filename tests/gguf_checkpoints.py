"""Small GGUF files written with the ``gguf`` package, with the same model as an HF folder.

:func:`write_pair` draws random weights, stores each tensor in a chosen GGUF
type (float, block-quantized and K-quantized: the K types get random valid
blocks, since the ``gguf`` package cannot quantize to them), and writes an HF
checkpoint folder whose fp32 weights are exactly the dequantized values. The
GGUF copy has q/k rows reordered the way llama.cpp's converter does, so
loading it checks pdserve's un-permutation too. The tokenizer is the BPE one
of :mod:`hf_checkpoints`, stored both ways, with its chat template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hf_checkpoints import CHAT_TEMPLATE, train_tokenizer
from safetensors.torch import save_file

from pdserve.modelspec import ArchConfig

gguf = __import__("gguf")
Q = gguf.GGMLQuantizationType

#: GGUF type of each weight (by HF name suffix and layer); norms are always F32.
LAYER_TYPES = (
    {"q_proj": "Q4_K", "k_proj": "Q5_K", "v_proj": "Q6_K", "o_proj": "Q4_0",
     "gate_proj": "Q4_1", "up_proj": "F16", "down_proj": "BF16"},
    {"q_proj": "Q8_0", "k_proj": "F32", "v_proj": "Q4_1", "o_proj": "Q6_K",
     "gate_proj": "Q5_K", "up_proj": "Q4_K", "down_proj": "Q8_0"},
)  # fmt: skip
EMBED_TYPE, HEAD_TYPE = "Q8_0", "Q6_K"
#: Scale written into random K-quant blocks (keeps weights around 0.01-0.1).
_K_SCALES = {"Q4_K": (1e-4, 1e-4), "Q5_K": (5e-5, 5e-5), "Q6_K": (3e-4, None)}
_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip


def small_arch(vocab_size: int) -> ArchConfig:
    """A 2-layer Llama whose rows are multiples of 256 (the K-quant block)."""
    return ArchConfig(
        architecture="LlamaForCausalLM",
        vocab_size=vocab_size,
        hidden_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        intermediate_size=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_ids=(4,),
    )


def llama_cpp_permute(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """The q/k row order of llama.cpp's converter, applied to rows (of values or of raw blocks)."""
    shape = rows.shape
    return rows.reshape(num_heads, 2, shape[0] // num_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _encode(values: np.ndarray, type_name: str, rng: np.random.Generator) -> np.ndarray:
    """Raw GGUF bytes (rows × bytes per row) of a [rows, cols] tensor in ``type_name``."""
    qtype = Q[type_name]
    if type_name not in _K_SCALES:
        return np.asarray(gguf.quants.quantize(values.astype(np.float32), qtype))
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = values.shape
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    d, dmin = _K_SCALES[type_name]
    if type_name == "Q6_K":  # ql[128] qh[64] scales[16] d
        raw[..., -2:] = np.frombuffer(np.float16(d).tobytes(), np.uint8)
    else:  # d, dmin, scales[12], ...
        raw[..., 0:2] = np.frombuffer(np.float16(d).tobytes(), np.uint8)
        raw[..., 2:4] = np.frombuffer(np.float16(dmin).tobytes(), np.uint8)
    return raw.reshape(rows, -1)


def _decode(raw: np.ndarray, type_name: str) -> np.ndarray:
    if type_name == "F32":
        return raw.astype(np.float32)
    return np.asarray(gguf.quants.dequantize(raw, Q[type_name]), dtype=np.float32)


def write_pair(out_dir: Path, *, seed: int = 0, with_tokenizer: bool = True) -> tuple[Path, Path, ArchConfig]:
    """(GGUF file, HF folder, arch) holding the same random model."""
    hf_dir = out_dir / "hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    train_tokenizer(hf_dir)
    tok_json = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab: dict[str, int] = tok_json["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    arch = small_arch(len(tokens))
    rng = np.random.default_rng(seed)

    hf_tensors: dict[str, torch.Tensor] = {}
    path = out_dir / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    _write_metadata(writer, arch, tokens, merges, with_tokenizer)

    def add(hf_name: str, gguf_name: str, shape: tuple[int, ...], type_name: str, permute_heads: int = 0):
        values = rng.normal(0, 1 / np.sqrt(shape[-1]), size=shape).astype(np.float32)
        if len(shape) == 1:
            values = (1 + 0.1 * values * np.sqrt(shape[-1])).astype(np.float32)  # a norm scale
            raw = values
        else:
            raw = _encode(values, type_name, rng)
        hf_tensors[hf_name] = torch.from_numpy(_decode(raw, type_name).reshape(shape).copy())
        stored = llama_cpp_permute(raw, permute_heads) if permute_heads else raw
        writer.add_tensor(gguf_name, np.ascontiguousarray(stored), raw_dtype=Q[type_name])

    h, inter = arch.hidden_size, arch.intermediate_size
    q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    add("model.embed_tokens.weight", "token_embd.weight", (arch.vocab_size, h), EMBED_TYPE)
    for i, types in enumerate(LAYER_TYPES):
        shapes = {
            "self_attn.q_proj": (q_size, h), "self_attn.k_proj": (kv_size, h),
            "self_attn.v_proj": (kv_size, h), "self_attn.o_proj": (h, q_size),
            "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h), "mlp.down_proj": (h, inter),
        }  # fmt: skip
        for name, shape in shapes.items():
            heads = {"self_attn.q_proj": arch.num_heads, "self_attn.k_proj": arch.num_kv_heads}.get(name, 0)
            add(
                f"model.layers.{i}.{name}.weight",
                f"blk.{i}.{_GGUF_NAMES[name]}.weight",
                shape,
                types[name.split(".")[1]],
                heads,
            )
        for norm in ("input_layernorm", "post_attention_layernorm"):
            add(f"model.layers.{i}.{norm}.weight", f"blk.{i}.{_GGUF_NAMES[norm]}.weight", (h,), "F32")
    add("model.norm.weight", "output_norm.weight", (h,), "F32")
    add("lm_head.weight", "output.weight", (arch.vocab_size, h), HEAD_TYPE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    save_file(hf_tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    config: dict[str, Any] = {**arch.to_hf_config(), "torch_dtype": "float32"}
    (hf_dir / "config.json").write_text(json.dumps(config))
    return path, hf_dir, arch


def _write_metadata(writer: Any, arch: ArchConfig, tokens: list[str], merges: list[str], tok: bool) -> None:
    writer.add_block_count(arch.num_layers)
    writer.add_context_length(arch.max_position_embeddings)
    writer.add_embedding_length(arch.hidden_size)
    writer.add_feed_forward_length(arch.intermediate_size)
    writer.add_head_count(arch.num_heads)
    writer.add_head_count_kv(arch.num_kv_heads)
    writer.add_layer_norm_rms_eps(arch.rms_norm_eps)
    writer.add_rope_freq_base(arch.rope_theta)
    writer.add_rope_dimension_count(arch.head_dim)
    writer.add_vocab_size(arch.vocab_size)
    if not tok:
        return
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    special = {"<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"}
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<s>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<pad>"))
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHAT_TEMPLATE)
