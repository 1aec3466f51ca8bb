"""S1's systems, one per process: ``python benchmarks/s1_systems.py SPEC.json OUT.json``.

:mod:`s1_engine_throughput` starts this script once per system and
configuration, so that each one's peak RSS is its own. A spec names the
system and its workload (token-id prompts and output lengths):

1. ``pdserve``: ``LLM("bench-50m", device="cpu", **options).generate`` over all
   requests at once, greedy, ``ignore_eos``.
2. ``hf_batched``: transformers ``generate`` over left-padded batches of
   ``batch_size`` requests, in arrival order or sorted by output length (then
   prompt length), longest first. A batch runs to its longest output; only each
   request's own tokens count.
3. ``hf_single``: transformers ``generate`` one request at a time, no padding.
4. ``limits``: pdserve's prefill and decode steps against torch GEMM of the
   same shapes and the memory bandwidth (:mod:`s1_limits`).

HF never stops at EOS (``generation_config.eos_token_id = None``, nothing is
masked), as pdserve with ``ignore_eos`` (which does not mask EOS either).
Every system gets one small warm-up call before it is timed.

Memory: ``peak_rss_bytes`` is ``ru_maxrss`` (the whole process);
``rss_after_imports_bytes`` and ``rss_after_load_bytes`` are the resident set
after importing the libraries and after building the model (pdserve: the
engine, KV pool included as far as it is resident).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

PAD_ID = 0  # the byte tokenizer's pad id; prompts never contain it
NUM_PARITY_REQUESTS = 16  # token ids kept for the parity check, per system


def rss_now_bytes() -> int:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory(rss_imports: int, rss_load: int) -> dict[str, int]:
    return {
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_after_imports_bytes": rss_imports,
        "rss_after_load_bytes": rss_load,
    }


# ----------------------------------------------------------------------------- pdserve


def run_pdserve(spec: dict[str, Any]) -> dict[str, Any]:
    from pdserve import LLM, SamplingParams

    rss_imports = rss_now_bytes()
    llm = LLM("bench-50m", device="cpu", **spec.get("options", {}))
    rss_load = rss_now_bytes()
    prompts, outputs = spec["prompts"], spec["output_lens"]
    warm = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    llm.generate([[7 + i] * 32 for i in range(4)], warm)
    engine = llm.engine
    steps0, preempt0 = engine.num_steps, engine.scheduler.num_preemptions
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in outputs]
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    wall_s = time.perf_counter() - start
    token_ids = [r.token_ids for r in results]
    assert all(len(t) == n for t, n in zip(token_ids, outputs, strict=True))
    return {
        "wall_s": wall_s,
        "num_output_tokens": sum(outputs),
        "output_tokens_per_s": sum(outputs) / wall_s,
        "num_steps": engine.num_steps - steps0,
        "num_preemptions": engine.scheduler.num_preemptions - preempt0,
        "num_kv_blocks": engine.runner.num_blocks,
        "memory": memory(rss_imports, rss_load),
        "parity_token_ids": token_ids[:NUM_PARITY_REQUESTS],
    }


# ----------------------------------------------------------------------------- transformers


def load_hf(ckpt: str) -> tuple[Any, int, int]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    rss_imports = rss_now_bytes()
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # never stop or mask at EOS (as ignore_eos)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.do_sample = False
    return model, rss_imports, rss_now_bytes()


def hf_generate(model: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy ``generate`` of a left-padded batch; returns each row's new tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=None,
            do_sample=False,
        )
    new = out[:, width:]
    assert new.shape[1] == max_new_tokens, f"HF stopped early: {new.shape[1]} < {max_new_tokens}"
    return new.tolist()


def batch_order(prompts: list[list[int]], output_lens: list[int], order: str) -> list[int]:
    """Request indices in the order batches are cut from."""
    indices = list(range(len(prompts)))
    if order == "arrival":
        return indices
    if order == "sorted":  # longest output first (it sets the batch's steps), then longest prompt
        return sorted(indices, key=lambda i: (-output_lens[i], -len(prompts[i])))
    raise ValueError(f"order={order!r}: use arrival or sorted")


def run_hf_batched(spec: dict[str, Any]) -> dict[str, Any]:
    model, rss_imports, rss_load = load_hf(spec["ckpt"])
    prompts, outputs = spec["prompts"], spec["output_lens"]
    batch_size, num_batches = spec["batch_size"], spec.get("num_batches")
    hf_generate(model, [[7] * 32, [8] * 16], 4)  # warm-up
    order = batch_order(prompts, outputs, spec["order"])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)][:num_batches]
    token_ids: dict[int, list[int]] = {}
    num_padded_steps = 0
    start = time.perf_counter()
    for batch in batches:
        steps = max(outputs[i] for i in batch)
        rows = hf_generate(model, [prompts[i] for i in batch], steps)
        num_padded_steps += steps * len(batch)
        for i, row in zip(batch, rows, strict=True):
            token_ids[i] = row[: outputs[i]]
    wall_s = time.perf_counter() - start
    num_tokens = sum(len(t) for t in token_ids.values())
    return {
        "wall_s": wall_s,
        "num_requests": len(token_ids),
        "num_output_tokens": num_tokens,
        "output_tokens_per_s": num_tokens / wall_s,
        "decode_slot_utilisation": num_tokens / num_padded_steps,
        "memory": memory(rss_imports, rss_load),
        "parity_token_ids": {str(i): t for i, t in token_ids.items() if i < NUM_PARITY_REQUESTS},
    }


def run_hf_single(spec: dict[str, Any]) -> dict[str, Any]:
    model, rss_imports, rss_load = load_hf(spec["ckpt"])
    prompts, outputs = spec["prompts"], spec["output_lens"]
    hf_generate(model, [[7] * 32], 4)  # warm-up
    start = time.perf_counter()
    token_ids = [hf_generate(model, [p], n)[0] for p, n in zip(prompts, outputs, strict=True)]
    wall_s = time.perf_counter() - start
    return {
        "wall_s": wall_s,
        "num_requests": len(prompts),
        "num_output_tokens": sum(outputs),
        "output_tokens_per_s": sum(outputs) / wall_s,
        "memory": memory(rss_imports, rss_load),
        "parity_token_ids": {str(i): t for i, t in enumerate(token_ids[:NUM_PARITY_REQUESTS])},
    }


def main() -> None:
    spec_path, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    spec = json.loads(spec_path.read_text())
    torch.manual_seed(0)
    system = spec["system"]
    if system == "pdserve":
        result = run_pdserve(spec)
    elif system == "hf_batched":
        result = run_hf_batched(spec)
    elif system == "hf_single":
        result = run_hf_single(spec)
    elif system == "limits":
        from s1_limits import run_limits

        result = run_limits(spec)
    else:
        raise SystemExit(f"unknown system {system!r}")
    result["torch_threads"] = torch.get_num_threads()
    out_path.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
