"""The ``pdserve`` command line: one sub-command per job."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from pdserve.errors import PDServeError
from pdserve.quick_exit import QUICK_EXIT_COMMANDS, exit_now

Command = Callable[[argparse.Namespace], int]


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs an engine."""
    parser.add_argument(
        "--model", default="tiny", help="preset (tiny, bench-50m), alias (smollm2-135m), GGUF file or HF dir"
    )
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
    parser.add_argument(
        "--quantization", default="none", choices=["none", "int8"], help="int8: int8 weights (CPU decode)"
    )


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
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
        "quantization": args.quantization,
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


def _serve(args: argparse.Namespace) -> int:
    from pdserve.launch.serve import run_serve

    return run_serve(args)


def add_trace_args(parser: argparse.ArgumentParser) -> None:
    """Tracing and SLO options shared by ``serve`` and ``router``."""
    parser.add_argument(
        "--trace-responses",
        action="store_true",
        help="answer with each request's trace and TTFT breakdown (the pdserve_trace field)",
    )
    parser.add_argument("--trace-log", default=None, help="append every request's trace to this JSONL file")
    parser.add_argument("--slo-ttft-ms", type=float, default=None, help="TTFT objective the dashboard draws")
    parser.add_argument("--slo-itl-ms", type=float, default=None, help="ITL objective the dashboard draws")


def _balance_factor(text: str) -> float:
    value = float(text)
    if value != 0 and not value >= 1:
        raise argparse.ArgumentTypeError(f"{text}: use a factor >= 1, or 0 for no bound")
    return value


def add_routing_args(parser: argparse.ArgumentParser, balance: bool = True) -> None:
    """``--policy`` and ``--disagg-policy`` (and, with ``balance``, ``--balance-factor``), as ``serve``
    and ``router`` take them."""
    parser.add_argument("--policy", default="kv_aware", choices=["kv_aware", "least_loaded", "round_robin"])
    parser.add_argument(
        "--disagg-policy",
        default="auto",
        choices=["auto", "always", "never"],
        help="prefill on a prefill worker: per request by cost (auto), always, or never (decode worker)",
    )
    if balance:
        add_balance_arg(parser)


def add_balance_arg(parser: argparse.ArgumentParser) -> None:
    """``--balance-factor``: the router's bounded-loads rule (docs/routing.md)."""
    parser.add_argument(
        "--balance-factor", type=_balance_factor, default=1.25,
        help="kv_aware: a worker with more than this x its pool's mean in-flight requests (+1) "
        "does not take a request for its cache alone (0: no bound)",
    )


def _worker(args: argparse.Namespace) -> int:
    import torch

    from pdserve.engine.llm import make_engine_config
    from pdserve.worker.config import WorkerConfig
    from pdserve.worker.worker import Worker

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = make_engine_config(args.model, role=args.role, **engine_options(args))
    worker = Worker(
        WorkerConfig(
            engine=engine,
            router=args.router,
            worker_id=args.worker_id or "",
            kv_host=args.kv_host,
            kv_advertise_host=args.kv_advertise_host,
            kv_transport=args.kv_transport,
            heartbeat_interval_s=args.heartbeat_interval,
            drain_timeout_s=args.drain_timeout,
            inject_fault=args.inject_fault,
            metrics_port=args.metrics_port,
            secret=cluster_secret(args),
        )
    )
    worker.run()
    return 0


def cluster_secret(args: argparse.Namespace) -> str:
    """The cluster secret comes from the environment, never from the command line (``ps`` shows it)."""
    import os

    return os.environ.get("PDSERVE_CLUSTER_SECRET", "")


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    from pdserve.launch.ray_resources import add_ray_args

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

    serve = sub.add_parser("serve", help="run router and workers on this host (OpenAI API)")
    serve.add_argument(
        "--model", default="tiny", help="preset (tiny, bench-50m), alias (smollm2-135m), GGUF file or HF dir"
    )
    serve.add_argument("--served-model-name", default=None, help="model id for clients (default: --model)")
    serve.add_argument("--mode", default="disaggregated", choices=["disaggregated", "aggregated"])
    serve.add_argument("--prefill", type=int, default=1, help="prefill workers (disaggregated)")
    serve.add_argument("--decode", type=int, default=1, help="decode workers (disaggregated)")
    serve.add_argument("--mixed", type=int, default=None,
                       help="mixed workers (aggregated: default 1; disaggregated: default 0, both stages)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    add_routing_args(serve)
    serve.add_argument("--kv-transport", default=None, choices=["shm", "tcp"], help="default: per pair")
    serve.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    serve.add_argument(
        "--quantization", default="none", choices=["none", "int8"], help="int8: int8 weights (CPU decode)"
    )
    serve.add_argument("--device", default="auto")
    serve.add_argument("--max-model-len", type=int, default=None)
    serve.add_argument("--threads-per-worker", type=int, default=0, help="0: share the cores evenly")
    serve.add_argument("--ready-timeout", type=float, default=120.0)
    serve.add_argument("--stop-timeout", type=float, default=None,
                       help="on Ctrl-C/SIGTERM, seconds to finish requests before a kill (10; Ray: 20)")
    serve.add_argument("--launcher", default="local", choices=["local", "ray"], help="where processes run")
    add_ray_args(serve)
    serve.add_argument(
        "--startup-wait", type=float, default=120.0,
        help="before the first worker pair registers, requests wait this long (then 503)",
    )
    add_trace_args(serve)
    from pdserve.planner.options import add_planner_args

    add_planner_args(serve)
    serve.add_argument(
        "--worker-args",
        nargs=argparse.REMAINDER,
        default=[],
        help="the rest of the line goes to every worker (engine options)",
    )
    commands["serve"] = _serve

    from pdserve.router.cli import add_router_parser, run_router_command

    add_router_parser(sub)
    commands["router"] = run_router_command


    worker = sub.add_parser("worker", help="run one worker and register it with a router")
    worker.add_argument("--role", required=True, choices=["prefill", "decode", "mixed"])
    worker.add_argument("--router", default="tcp://127.0.0.1:5557", help="the router's control endpoint")
    worker.add_argument("--worker-id", default=None)
    worker.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    worker.add_argument("--kv-host", default="127.0.0.1", help="interface the KV receiver binds to")
    worker.add_argument(
        "--kv-advertise-host", default=None, help="address prefill workers dial (with --kv-host 0.0.0.0)"
    )
    worker.add_argument("--kv-transport", default=None, choices=["shm", "tcp"], help="default: per pair")
    worker.add_argument("--heartbeat-interval", type=float, default=0.5)
    worker.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port (0: any)")
    worker.add_argument(
        "--drain-timeout", type=float, default=30.0, help="on SIGTERM, finish work for this long"
    )
    worker.add_argument(
        "--inject-fault",
        default=None,
        choices=["drop-kv-done"],
        help="testing only: make this worker misbehave (drop-kv-done: KV hand-offs never complete)",
    )
    add_engine_args(worker)
    commands["worker"] = _worker

    from pdserve.bench.cli import add_bench_parser, run_bench

    add_bench_parser(sub)
    commands["bench"] = run_bench

    from pdserve.sim.cli import add_profile_parser, add_simulate_parser, run_profile, run_simulate

    add_profile_parser(sub)
    commands["profile"] = run_profile
    add_simulate_parser(sub)
    commands["simulate"] = run_simulate
    from pdserve.sim.plan_cli import add_plan_parser, run_plan

    add_plan_parser(sub)
    commands["plan"] = run_plan

    from pdserve.status import add_status_parser, run_status

    add_status_parser(sub)
    commands["status"] = run_status

    from pdserve.scale import add_scale_parser, run_scale

    add_scale_parser(sub)
    commands["scale"] = run_scale
    return parser, commands


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pdserve`` console script."""
    parser, commands = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        code = commands[args.command](args)
    except PDServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if argv is None and args.command in QUICK_EXIT_COMMANDS:  # the process's own command line
        exit_now(code)  # everything was closed already; skip the interpreter's slow teardown
    return code


if __name__ == "__main__":
    sys.exit(main())
