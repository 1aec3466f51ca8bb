"""``pdserve scale``: set a running deployment's pool sizes (and threads) and wait until it has them.

``pdserve scale --url URL --prefill 2 --decode 3`` posts the new targets to
the router (``POST /pdserve/scale``, with ``PDSERVE_API_KEY`` as Bearer key
when set); the supervisor then starts, drains or flips workers.
``--threads N`` sets every worker's torch threads as well (docs/scaling.md).
Unless ``--no-wait``, the command follows ``/pdserve/workers`` until every
pool has its target of ready workers and, with ``--threads``, every one of
them reports N threads (exit 0), a worker of a changed pool failed to start
(exit 1, with its reason), or ``--timeout`` passed (exit 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import httpx

POOLS = ("prefill", "decode", "mixed")
BUSY_STATES = ("starting", "draining", "flipping", "restarting")


def add_scale_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``scale`` to ``pdserve``'s sub-commands."""
    parser = subparsers.add_parser("scale", help="change the worker pools of a running deployment")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the router's base URL")
    for pool in POOLS:
        parser.add_argument(f"--{pool}", type=int, default=None, help=f"target number of {pool} workers")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of every worker (1 to 256)")
    parser.add_argument("--no-wait", action="store_true", help="return once the router took the targets")
    parser.add_argument("--timeout", type=float, default=300.0, help="how long to wait for the new shape")


def pools_line(deployment: dict[str, Any]) -> str:
    """``prefill 2/2  decode 1/3 (starting 2)``: actual/target per pool, with the slots in motion."""
    parts = []
    for pool, info in deployment["pools"].items():
        if not info["target"] and not info["actual"] and not info["states"]:
            continue  # a pool this deployment does not use
        moving = ", ".join(f"{s} {n}" for s, n in info["states"].items() if s != "ready")
        target = "-" if info["target"] is None else info["target"]
        parts.append(f"{pool} {info['actual']}/{target}" + (f" ({moving})" if moving else ""))
    return "  ".join(parts)


def threads_note(workers: list[dict[str, Any]], want: int | None) -> str:
    """``  threads 2/3 at 2``: how many of the serving workers report ``want`` threads (none if None)."""
    if want is None:
        return ""
    serving = [w for w in workers if not w.get("draining")]
    return f"  threads {sum(w.get('threads') == want for w in serving)}/{len(serving)} at {want}"


def run_scale(args: argparse.Namespace) -> int:
    """Post the targets; wait for them unless ``--no-wait``."""
    body = {key: getattr(args, key) for key in (*POOLS, "threads") if getattr(args, key) is not None}
    if not body:
        print("error: give at least one of --prefill, --decode, --mixed, --threads", file=sys.stderr)
        return 2
    key = os.environ.get("PDSERVE_API_KEY", "").split(",")[0].strip()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        reply = httpx.post(f"{args.url}/pdserve/scale", json=body, headers=headers, timeout=10.0)
    except httpx.HTTPError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    if reply.status_code != 200:
        try:
            message = reply.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = reply.text
        print(f"error ({reply.status_code}): {message}", file=sys.stderr)
        return 1
    answer = reply.json()
    print(f"targets {answer['previous']} -> {answer['targets']}", flush=True)
    if args.threads is not None:
        print(f"threads {answer.get('previous_threads')} -> {answer.get('threads')}", flush=True)
    if args.no_wait:
        return 0
    changed = {p for p in POOLS if answer["targets"][p] != answer["previous"][p]}
    deadline = time.monotonic() + args.timeout
    last = ""
    while True:
        try:
            data = httpx.get(f"{args.url}/pdserve/workers?stats=false", headers=headers, timeout=10.0).json()
            deployment = data["deployment"]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            print(f"error: cannot read {args.url}: {exc}", file=sys.stderr)
            return 1
        line = pools_line(deployment) + threads_note(data["workers"], args.threads)
        if line != last:
            print(line, flush=True)
            last = line
        failed = [w for w in deployment["workers"] if w["state"] == "failed" and w["role"] in changed]
        if failed:
            for w in failed:
                print(f"error: {w['worker_id']} ({w['role']}) failed: {w['message']}", file=sys.stderr)
            return 1
        settled = not any(w["state"] in BUSY_STATES for w in deployment["workers"])
        at_threads = args.threads is None or all(
            w.get("threads") == args.threads for w in data["workers"] if not w.get("draining"))
        if settled and at_threads and all(info["actual"] == info["target"]
                                          for info in deployment["pools"].values()):
            print("done", flush=True)
            return 0
        if time.monotonic() > deadline:
            print(f"error: not at the targets after {args.timeout:.0f} s", file=sys.stderr)
            return 1
        time.sleep(0.25)
