"""``pdserve router``: the router (OpenAI API + dispatcher) as a process of its own.

Its options become a :class:`~pdserve.router.server.RouterConfig` with a
:class:`~pdserve.router.dispatch_config.DispatcherConfig`; ``pdserve serve``
starts this command for its router process.
"""

from __future__ import annotations

import argparse
import os
from typing import Any


def add_router_parser(sub: Any) -> None:
    """Add ``pdserve router``."""
    from pdserve.cli import add_balance_arg, add_routing_args, add_trace_args

    router = sub.add_parser("router", help="run the router (OpenAI API + dispatcher) alone")
    router.add_argument("--model", default="tiny")
    router.add_argument("--served-model-name", default=None)
    router.add_argument("--host", default="127.0.0.1")
    router.add_argument("--port", type=int, default=8000)
    router.add_argument("--control-host", default="127.0.0.1", help="interface workers connect to")
    router.add_argument("--control-port", type=int, default=5557)
    add_routing_args(router, balance=False)
    router.add_argument(
        "--kv-block-size",
        type=int,
        default=None,
        help="block size of the cache index; workers with another are refused (default: the first worker's)",
    )
    add_balance_arg(router)
    router.add_argument("--max-model-len", type=int, default=None)
    router.add_argument("--lease", type=float, default=30.0, help="heartbeat lease of workers, seconds")
    router.add_argument("--kv-timeout", type=float, default=10.0, help="first token → KV at decode, s")
    router.add_argument("--prefill-timeout", type=float, default=120.0, help="dispatch → first token, s")
    router.add_argument(
        "--kv-failure-policy",
        default="retry",
        choices=["retry", "recompute", "fail"],
        help="a missed KV deadline: new attempt, prefill on the decode worker, or an error",
    )
    router.add_argument(
        "--no-prefill-fallback",
        action="store_true",
        help="with no prefill worker left, fail instead of prefilling on decode workers",
    )
    router.add_argument("--max-attempts", type=int, default=4, help="attempts per request (retries + 1)")
    router.add_argument(
        "--api-key",
        action="append",
        help="accepted Bearer key (repeatable; PDSERVE_API_KEY keeps it out of ps)",
    )
    router.add_argument("--max-inflight", type=int, default=1024, help="admitted requests; 0: unlimited")
    router.add_argument("--drain-timeout", type=float, default=30.0, help="on SIGTERM, finish for this long")
    router.add_argument(
        "--event-loop",
        default="auto",
        choices=["auto", "uvloop", "asyncio"],
        help="auto: uvloop where installed",
    )
    router.add_argument(
        "--http", default="auto", choices=["auto", "httptools", "h11"], help="auto: httptools if installed"
    )
    router.add_argument(
        "--ready-file", default=None, help="once listening, write the ports it got here (JSON; for launchers)"
    )
    router.add_argument(
        "--startup-wait", type=float, default=120.0,
        help="before the first worker pair registers, requests wait this long (then 503)",
    )
    add_trace_args(router)


def run_router_command(args: argparse.Namespace) -> int:
    """Run the router until it is stopped (``pdserve router``)."""
    from pdserve.cli import cluster_secret
    from pdserve.router.dispatch_config import DispatcherConfig
    from pdserve.router.server import RouterConfig, run_router

    dispatch = DispatcherConfig(
        policy=args.policy,
        disagg_policy=args.disagg_policy,
        kv_block_size=args.kv_block_size,
        balance_factor=args.balance_factor or None,
        lease_s=args.lease,
        kv_timeout_s=args.kv_timeout,
        prefill_timeout_s=args.prefill_timeout,
        kv_failure_policy=args.kv_failure_policy,
        prefill_fallback=not args.no_prefill_fallback,
        max_attempts=args.max_attempts,
        secret=cluster_secret(args),
    )
    run_router(
        RouterConfig(
            model=args.model,
            served_model_name=args.served_model_name,
            host=args.host,
            port=args.port,
            control_host=args.control_host,
            control_port=args.control_port,
            max_model_len=args.max_model_len,
            dispatch=dispatch,
            api_keys=api_keys(args),
            max_inflight=args.max_inflight or None,
            drain_timeout_s=args.drain_timeout,
            trace_responses=args.trace_responses,
            trace_log=args.trace_log,
            event_loop=args.event_loop,
            http=args.http,
            ready_file=args.ready_file,
            slo_ttft_ms=args.slo_ttft_ms,
            slo_itl_ms=args.slo_itl_ms,
            startup_wait_s=args.startup_wait,
        )
    )
    return 0


def api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    """API keys from ``--api-key`` (repeatable) and ``PDSERVE_API_KEY`` (comma-separated)."""
    keys = list(args.api_key or [])
    keys += [k.strip() for k in os.environ.get("PDSERVE_API_KEY", "").split(",") if k.strip()]
    return tuple(keys)
