"""How close pdserve's steps come to this machine's limits, measured in one process.

1. GEMM ceiling at T tokens: ``F.linear`` of a [T, in] activation by every
   linear weight of the loaded bench-50m (8 layers × qkv, o, gate_up, down)
   plus the LM head on the rows that sample; its time is the sum.
2. pdserve prefill: one ``LLMEngine.step()`` that computes T fresh prompt
   tokens (one prompt of T, or 8 prompts of T / 8) and samples each prompt's
   first token. Achieved FLOP/s counts ``2 × linear params × T`` (LM head:
   sampled rows only) plus causal attention, ``2 × heads × head_dim × n(n+1)``
   per layer and prompt of n tokens. GEMM and prefill alternate, best of N each
   (the machine is shared: the best run is the least disturbed one).
3. Memory bandwidth: ``sum`` (read) and ``copy_`` of a 512 MiB fp32 tensor,
   best of 1 and 2 threads.
4. pdserve decode: B requests (prompt 256) prefilled, then single-token steps
   timed (median). Bounds: weight bytes read per step (linear weights and LM
   head) / read bandwidth; the same plus the useful K/V bytes of the context;
   and torch GEMM of the same [B, in] shapes.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

PREFILL_CASES = ((1, 256), (1, 512), (1, 2048), (8, 256))  # (prompts, tokens each) per step
DECODE_BATCHES = (1, 64)
DECODE_PROMPT_TOKENS = 256
BANDWIDTH_BYTES = 512 << 20


def best_time_s(fn: Any, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def linear_weights(model: Any) -> list[torch.Tensor]:
    """Every per-token linear weight of the model, in forward order (no LM head)."""
    weights = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        weights += [attn.qkv_proj.weight, attn.o_proj.weight, mlp.gate_up_proj.weight, mlp.down_proj.weight]
    return weights


def gemm_s(
    weights: list[torch.Tensor], lm_head: torch.Tensor, num_tokens: int, num_sampled: int, reps: int
) -> float:
    """Best time of the model's linear layers as bare GEMMs on random activations."""
    inputs = {w.shape[1]: torch.randn(num_tokens, w.shape[1]) for w in weights}
    head_in = torch.randn(num_sampled, lm_head.shape[1])

    def run() -> None:
        for w in weights:
            F.linear(inputs[w.shape[1]], w)
        F.linear(head_in, lm_head)

    run()
    return best_time_s(run, reps)


def bandwidth_gbps(reps: int = 5) -> dict[str, float]:
    """Read (``sum``) and copy bandwidth, the best of 1 and 2 threads (one thread reads as fast here)."""
    x = torch.ones(BANDWIDTH_BYTES // 4)
    y = torch.empty_like(x).fill_(0.0)  # pre-faulted
    threads = torch.get_num_threads()
    read_s = copy_s = float("inf")
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        read_s = min(read_s, best_time_s(lambda: x.sum(), reps))
        copy_s = min(copy_s, best_time_s(lambda: y.copy_(x), reps))
    torch.set_num_threads(threads)
    return {"read_gbps": BANDWIDTH_BYTES / read_s / 1e9, "copy_gbps": 2 * BANDWIDTH_BYTES / copy_s / 1e9}


def run_limits(spec: dict[str, Any]) -> dict[str, Any]:
    from pdserve import LLM, SamplingParams

    reps = spec.get("reps", 5)
    llm = LLM(
        "bench-50m", device="cpu", chunk_size=2048, max_num_batched_tokens=2048, enable_prefix_caching=False
    )
    engine = llm.engine
    arch, model = engine.arch, engine.runner.model
    weights = linear_weights(model)
    lm_head = model.lm_head.weight if model.lm_head is not None else model.model.embed_tokens.weight
    linear_params = sum(w.numel() for w in weights)
    head_params = lm_head.numel()
    rng = random.Random(1)
    first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def prefill_step(num_prompts: int, num_tokens: int) -> None:
        for _ in range(num_prompts):
            engine.add_request([rng.randrange(300, arch.vocab_size) for _ in range(num_tokens)], first)
        engine.step()
        assert not engine.has_unfinished_requests(), "the prompts did not fit in one step"

    prefill_step(2, 64)  # warm-up
    prefill = []
    for num_prompts, each in PREFILL_CASES:
        total = num_prompts * each
        num_reps = reps if total <= 512 else max(2, reps - 2)
        gemm_best, step_best = float("inf"), float("inf")
        for _ in range(num_reps):  # alternate, so that both see the same moments of the machine
            gemm_best = min(gemm_best, gemm_s(weights, lm_head, total, num_prompts, 1))
            step_best = min(step_best, best_time_s(lambda n=num_prompts, e=each: prefill_step(n, e), 1))
        gemm_flops = 2 * (linear_params * total + head_params * num_prompts)
        attn_flops = num_prompts * arch.num_layers * 2 * arch.num_heads * arch.head_dim * each * (each + 1)
        prefill.append(
            {
                "num_prompts": num_prompts,
                "prompt_tokens": each,
                "num_tokens": total,
                "step_s": step_best,
                "tokens_per_s": total / step_best,
                "flops": gemm_flops + attn_flops,
                "attention_flops": attn_flops,
                "achieved_gflops": (gemm_flops + attn_flops) / step_best / 1e9,
                "gemm_s": gemm_best,
                "gemm_gflops": gemm_flops / gemm_best / 1e9,
                "fraction_of_gemm": ((gemm_flops + attn_flops) / step_best) / (gemm_flops / gemm_best),
            }
        )

    bandwidth = bandwidth_gbps()
    weight_bytes = (linear_params + head_params) * lm_head.element_size()
    kv_bytes_per_token = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * lm_head.element_size()
    decode = []
    for batch in DECODE_BATCHES:
        num_steps = 24
        params = SamplingParams(max_tokens=num_steps + 2, temperature=0.0, ignore_eos=True)
        for _ in range(batch):
            engine.add_request(
                [rng.randrange(300, arch.vocab_size) for _ in range(DECODE_PROMPT_TOKENS)], params
            )
        while (
            any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running)
            or engine.scheduler.waiting
        ):
            engine.step()
        times = []
        for _ in range(num_steps):
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
        context = DECODE_PROMPT_TOKENS + 1 + num_steps // 2  # mid-run context length
        while engine.has_unfinished_requests():
            engine.step()
        kv_bytes = batch * context * kv_bytes_per_token
        gemm_best = gemm_s(weights, lm_head, batch, batch, reps)
        step_s = statistics.median(times)
        decode.append(
            {
                "batch": batch,
                "context_tokens": context,
                "step_s": step_s,
                "min_step_s": min(times),
                "weight_bytes": weight_bytes,
                "kv_bytes": kv_bytes,
                "weight_bound_s": weight_bytes / (bandwidth["read_gbps"] * 1e9),
                "weight_kv_bound_s": (weight_bytes + kv_bytes) / (bandwidth["read_gbps"] * 1e9),
                "gemm_s": gemm_best,
            }
        )
    return {
        "prefill": prefill,
        "bandwidth": bandwidth,
        "decode": decode,
        "linear_params": linear_params,
        "lm_head_params": head_params,
    }
