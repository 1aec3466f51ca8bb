"""``pdserve bench``: load-test any OpenAI-compatible server.

Steps of :func:`run_bench`:

1. Turn the options into the workload, client and load configurations
   (errors name the allowed values); ask ``/v1/models`` for the model name
   unless ``--model`` gives it.
2. Run once at ``--request-rate``, or once per rate of ``--sweep``.
3. Print the summary table(s); write ``--output`` JSON and, with ``--plots``,
   an HTML report (inline SVG, always) and PNGs (with matplotlib).

``add_bench_parser`` adds the sub-command to ``pdserve``'s parser;
``python -m pdserve.bench`` runs the same options on their own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
from typing import Any

from pdserve.bench.arrivals import ARRIVAL_KINDS, ArrivalConfig
from pdserve.bench.client import ENDPOINTS, ClientConfig, discover_model, make_http_client
from pdserve.bench.html_report import write_html_report
from pdserve.bench.metrics import SLO
from pdserve.bench.plots import MISSING_MESSAGE, have_matplotlib, write_plots
from pdserve.bench.report import format_summary, format_sweep, result_json, write_json
from pdserve.bench.runner import LoadConfig, RunResult, SweepResult, run_load, run_sweep
from pdserve.bench.workload import WORKLOAD_KINDS, WorkloadConfig, make_counter, make_workload
from pdserve.errors import PDServeError

logger = logging.getLogger(__name__)

DEFAULT_NUM_REQUESTS = 200

EPILOG = """\
lengths (--input-len/--output-len): N | uniform:LO:HI | lognormal:MEDIAN:SIGMA[:MIN:MAX]
  (token counts; without --tokenizer one word ≈ one token)
examples:
  pdserve bench --base-url http://127.0.0.1:8000 --workload chat --request-rate 4 --num-requests 200
  pdserve bench --sweep 1,2,4,8 --duration 60 --warmup 5s --slo ttft_ms=500,tpot_ms=50 \\
      --output result.json --plots plots/
  pdserve bench --workload sharegpt --dataset sg.json --endpoint chat --max-concurrency 32
"""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add every ``bench`` option to ``parser``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    target = parser.add_argument_group("server")
    target.add_argument(
        "--base-url", default="http://127.0.0.1:8000", help="server root (default %(default)s)"
    )
    target.add_argument("--endpoint", default="completions", choices=sorted(ENDPOINTS))
    target.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    target.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY if set)")
    target.add_argument("--header", action="append", default=[], metavar="NAME:VALUE", help="extra header")
    target.add_argument(
        "--extra-body", default=None, metavar="JSON", help="more body fields, e.g. '{\"top_k\": 1}'"
    )
    target.add_argument(
        "--no-ignore-eos", dest="ignore_eos", action="store_false", help="do not send ignore_eos: true"
    )
    target.add_argument("--timeout", type=float, default=600.0, help="seconds per connect / read")
    target.add_argument(
        "--max-connections", type=int, default=None, help="default: --max-concurrency or 1024"
    )

    add_workload_args(parser)
    add_load_args(parser)
    add_results_args(parser)


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The workload options (shared with ``pdserve simulate``: same names, same requests)."""
    work = parser.add_argument_group("workload")
    work.add_argument("--workload", default="synthetic", choices=WORKLOAD_KINDS)
    work.add_argument("--input-len", default=None, help="prompt tokens (default depends on --workload)")
    work.add_argument("--output-len", default=None, help="output tokens (max_tokens)")
    work.add_argument("--dataset", default=None, help="ShareGPT JSON file (--workload sharegpt)")
    work.add_argument("--max-prompt-tokens", type=int, default=4096, help="skip longer ShareGPT prompts")
    work.add_argument("--num-prefixes", type=int, default=4, help="shared-prefix: system prompts")
    work.add_argument(
        "--users-per-prefix", type=int, default=8, help="shared-prefix: users per system prompt"
    )
    work.add_argument("--turns", type=int, default=3, help="shared-prefix: turns per conversation")
    work.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: system prompt tokens")
    work.add_argument(
        "--tokenizer",
        default=None,
        help="count tokens with pdserve's tokenizer: tiny, bench-50m or an HF dir",
    )
    work.add_argument("--seed", type=int, default=0, help="seeds the workload and the arrivals")


def add_load_args(parser: argparse.ArgumentParser) -> None:
    """The arrival and run-length options (shared with ``pdserve simulate``)."""
    load = parser.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=math.inf, help="req/s (default inf: all at once)")
    load.add_argument("--arrival", default="poisson", choices=ARRIVAL_KINDS)
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (1 = Poisson, < 1 burstier)")
    load.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    count = load.add_mutually_exclusive_group()
    count.add_argument("--num-requests", type=int, default=None, help=f"default {DEFAULT_NUM_REQUESTS}")
    count.add_argument("--duration", type=float, default=None, help="seconds of arrivals instead")
    load.add_argument("--warmup", default="0", help="N leading requests, or Ns leading seconds, not measured")
    load.add_argument("--sweep", default=None, metavar="R1,R2,...", help="one run per request rate")
    load.add_argument("--attainment-target", type=float, default=0.9, help="sweep verdict threshold")


def add_results_args(parser: argparse.ArgumentParser) -> None:
    """The SLO and output options (shared with ``pdserve simulate``)."""
    out = parser.add_argument_group("results")
    out.add_argument("--slo", default=None, metavar="ttft_ms=..,tpot_ms=..", help="also itl_ms, e2e_ms")
    out.add_argument("--output", default=None, help="write the result JSON here")
    out.add_argument("--no-request-records", action="store_true", help="leave per-request records out")
    out.add_argument(
        "--plots", default=None, metavar="DIR", help="write report.html and PNG plots (with matplotlib) here"
    )
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_bench_parser(subparsers: Any) -> None:
    """Add ``bench`` to ``pdserve``'s sub-commands (``subparsers`` from ``add_subparsers``)."""
    parser = subparsers.add_parser(
        "bench",
        help="load-test an OpenAI-compatible server (TTFT, ITL, TPOT, goodput)",
        description="Open-loop load generator for OpenAI-compatible servers.",
    )
    configure_parser(parser)


def _parse_warmup(value: str) -> tuple[int, float]:
    value = value.strip()
    try:
        if value.endswith("s"):
            return 0, float(value[:-1])
        return int(value), 0.0
    except ValueError:
        raise PDServeError(f"--warmup {value!r}: give a number of requests (10) or seconds (5s)") from None


def _parse_headers(args: argparse.Namespace) -> dict[str, str]:
    headers = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise PDServeError(f"--header {item!r}: write NAME:VALUE")
        headers[name.strip()] = value.strip()
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    if api_key:
        headers.setdefault("Authorization", f"Bearer {api_key}")
    return headers


def _parse_rates(spec: str) -> list[float]:
    try:
        rates = [float(r) for r in spec.split(",") if r.strip()]
    except ValueError:
        raise PDServeError(f"--sweep {spec!r}: give rates separated by commas, e.g. 1,2,4") from None
    if not rates:
        raise PDServeError("--sweep needs at least one rate")
    return rates


def _config_json(args: argparse.Namespace, model: str) -> dict[str, Any]:
    config = {k: v for k, v in vars(args).items() if not callable(v) and k not in ("api_key", "header")}
    config["model"] = model
    config["header_names"] = [h.partition(":")[0] for h in args.header]
    return config


def workload_config(args: argparse.Namespace) -> WorkloadConfig:
    """The :class:`WorkloadConfig` named by :func:`add_workload_args`' options."""
    return WorkloadConfig(
        kind=args.workload,
        input_len=args.input_len,
        output_len=args.output_len,
        seed=args.seed,
        num_prefixes=args.num_prefixes,
        users_per_prefix=args.users_per_prefix,
        turns=args.turns,
        prefix_len=args.prefix_len,
        dataset=args.dataset,
        max_prompt_tokens=args.max_prompt_tokens,
    )


async def _bench(args: argparse.Namespace) -> int:
    warmup_requests, warmup_s = _parse_warmup(args.warmup)
    extra_body = json.loads(args.extra_body) if args.extra_body else {}
    if not isinstance(extra_body, dict):
        raise PDServeError("--extra-body must be a JSON object")
    workload = workload_config(args)
    counter = make_counter(args.tokenizer)
    slo = SLO.parse(args.slo)
    num_requests = args.num_requests
    if num_requests is None and args.duration is None:
        num_requests = DEFAULT_NUM_REQUESTS
    load = LoadConfig(
        arrivals=ArrivalConfig(
            rate=args.request_rate, kind=args.arrival, burstiness=args.burstiness, seed=args.seed
        ),
        num_requests=num_requests,
        duration_s=args.duration,
        max_concurrency=args.max_concurrency,
        warmup_requests=warmup_requests,
        warmup_s=warmup_s,
        progress=not args.no_progress,
    )
    client_config = ClientConfig(
        base_url=args.base_url,
        model=args.model or "",
        endpoint=args.endpoint,
        ignore_eos=args.ignore_eos,
        extra_body=extra_body,
        headers=_parse_headers(args),
        timeout_s=args.timeout,
        max_connections=args.max_connections or args.max_concurrency or 1024,
    )
    if args.plots and not have_matplotlib():
        print(f"warning: {MISSING_MESSAGE}; only report.html will be written", file=sys.stderr)
    if not client_config.model:
        async with make_http_client(client_config) as http:
            model = await discover_model(http, client_config.root_url)
        client_config = ClientConfig(**{**client_config.__dict__, "model": model})

    def show(run: RunResult) -> None:
        print(format_summary(run, title=f"{client_config.model} {args.workload}"), flush=True)

    sweep: SweepResult | None = None
    if args.sweep:
        sweep = await run_sweep(
            client_config,
            load,
            _parse_rates(args.sweep),
            lambda: make_workload(workload, counter),
            slo,
            counter,
            target=args.attainment_target,
            on_run=show,
        )
        runs = sweep.runs
        print(format_sweep(sweep))
    else:
        runs = [await run_load(client_config, load, make_workload(workload, counter), slo, counter)]
        show(runs[0])
    if args.output:
        result = result_json(
            _config_json(args, client_config.model), runs, sweep, not args.no_request_records
        )
        print(f"results written to {write_json(args.output, result)}")
    if args.plots:
        title = f"pdserve bench: {client_config.model} {args.workload}"
        print(f"report written to {write_html_report(args.plots, runs, sweep, title)}")
    if args.plots and have_matplotlib():
        for path in write_plots(args.plots, runs, sweep):
            print(f"plot written to {path}")
        from pdserve.bench.planner_plot import planner_history, plot_pools

        if history := planner_history(client_config.root_url, client_config.headers):
            print(f"plot written to {plot_pools(args.plots, history)}")
    return 1 if all(r.summary.num_ok == 0 for r in runs) else 0


def run_bench(args: argparse.Namespace) -> int:
    """Run ``pdserve bench``; 0 on success, 1 when no request succeeded, 2 on bad options."""
    try:
        return asyncio.run(_bench(args))
    except (PDServeError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
