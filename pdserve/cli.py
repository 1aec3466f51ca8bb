"""The ``pdserve`` command line: one sub-command per job."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence

from pdserve.errors import PDServeError

Command = Callable[[argparse.Namespace], int]


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs an engine."""
    parser.add_argument("--model", default="tiny", help="preset (tiny, bench-50m) or HF checkpoint dir")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=None, help="KV blocks (default: --kv-cache-mib)")
    parser.add_argument("--kv-cache-mib", type=int, default=512, help="KV memory if --num-blocks is unset")
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=512, help="prompt tokens per request per step")
    parser.add_argument("--no-chunked-prefill", action="store_true")
    parser.add_argument("--seed", type=int, default=0, help="seed of dummy weights and unseeded sampling")


def engine_options(args: argparse.Namespace) -> dict[str, object]:
    """The engine options named by :func:`add_engine_args`, for ``make_engine_config``."""
    return {
        "dtype": args.dtype,
        "device": args.device,
        "max_model_len": args.max_model_len,
        "block_size": args.block_size,
        "num_blocks": args.num_blocks,
        "kv_cache_bytes": args.kv_cache_mib << 20,
        "enable_prefix_caching": not args.no_prefix_caching,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_num_seqs": args.max_num_seqs,
        "chunk_size": args.chunk_size,
        "enable_chunked_prefill": not args.no_chunked_prefill,
        "seed": args.seed,
    }


def _generate(args: argparse.Namespace) -> int:
    from pdserve.engine.llm import LLM
    from pdserve.sampling_params import SamplingParams

    prompts: list[str] = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts.extend(line.rstrip("\n") for line in f if line.strip())
    if not prompts:
        print("error: give a prompt or --prompts-file", file=sys.stderr)
        return 2
    llm = LLM(args.model, **engine_options(args))
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.sampling_seed,
        stop=args.stop or [],
        ignore_eos=args.ignore_eos,
    )
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=len(prompts) > 1 and sys.stderr.isatty())
    elapsed_s = time.perf_counter() - start
    for prompt, out in zip(prompts, outputs, strict=True):
        if len(prompts) > 1:
            print(f"--- {prompt!r} ({out.finish_reason})")
        print(out.text)
    num_tokens = sum(len(o.token_ids) for o in outputs)
    print(
        f"[{len(outputs)} request(s), {num_tokens} tokens in {elapsed_s:.2f} s, "
        f"{num_tokens / elapsed_s:.1f} tok/s]",
        file=sys.stderr,
    )
    return 0


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated LLM serving.")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, Command] = {}

    gen = sub.add_parser("generate", help="generate text offline (no server)")
    gen.add_argument("prompt", nargs="*", help="prompt text (several allowed)")
    gen.add_argument("--prompts-file", help="a file with one prompt per line")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    add_engine_args(gen)
    commands["generate"] = _generate
    return parser, commands


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pdserve`` console script."""
    parser, commands = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return commands[args.command](args)
    except PDServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
