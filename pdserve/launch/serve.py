"""``pdserve serve``: a supervised deployment (router + worker pools) on a backend.

Builds the router's and the workers' command lines from the ``serve``
options, picks the backend (``--launcher``: ``local`` child processes; Ray is
added by :mod:`pdserve.launch.ray` where installed), starts everything through
the :class:`~pdserve.launch.supervisor.Supervisor`, prints the ready line, and
supervises until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import secrets

from pdserve.launch.base import Backend, WorkerSpec
from pdserve.launch.supervisor import Supervisor, SupervisorConfig
from pdserve.planner import options as planner_options
from pdserve.planner import thread_scaling
from pdserve.planner.planner import PlannerConfig
from pdserve.planner.runner import PlannerRunner

logger = logging.getLogger(__name__)


def router_args(args: argparse.Namespace) -> list[str]:
    """``pdserve router`` arguments for ``serve``'s options (ports are the supervisor's)."""
    out = ["--host", args.host, "--model", args.model, "--policy", args.policy,
           "--disagg-policy", args.disagg_policy, "--startup-wait", str(args.startup_wait)]
    if args.max_model_len:
        out += ["--max-model-len", str(args.max_model_len)]
    if (factor := getattr(args, "balance_factor", None)) is not None:
        out += ["--balance-factor", f"{factor:g}"]
    if getattr(args, "served_model_name", None):
        out += ["--served-model-name", args.served_model_name]
    if args.trace_responses:
        out.append("--trace-responses")
    if args.trace_log:
        out += ["--trace-log", args.trace_log]
    for name in ("slo_ttft_ms", "slo_itl_ms"):  # the dashboard's SLO lines
        if (value := getattr(args, name, None)) is not None:
            out += ["--" + name.replace("_", "-"), f"{value:g}"]
    return out


def worker_args(args: argparse.Namespace) -> list[str]:
    """``pdserve worker`` arguments shared by every worker (engine options, transport...)."""
    out = [*args.worker_args, "--model", args.model, "--device", args.device, "--dtype", args.dtype]
    if args.max_model_len:
        out += ["--max-model-len", str(args.max_model_len)]
    if args.kv_transport:
        out += ["--kv-transport", args.kv_transport]
    if getattr(args, "quantization", "none") != "none":
        out += ["--quantization", args.quantization]
    return out


def targets(args: argparse.Namespace) -> dict[str, int]:
    """Initial pool sizes from ``--mode`` and the counts.

    ``--mixed`` defaults to 1 in aggregated mode and to 0 in disaggregated mode,
    where mixed workers join both stages next to the prefill and decode pools.
    """
    if args.mode == "aggregated":
        return {"prefill": 0, "decode": 0, "mixed": 1 if args.mixed is None else args.mixed}
    return {"prefill": args.prefill, "decode": args.decode, "mixed": args.mixed or 0}


def make_backend(args: argparse.Namespace) -> Backend:
    """The backend ``--launcher`` names."""
    from pdserve.launch import ray_resources

    stop: dict[str, float] = {}
    if (stop_timeout := getattr(args, "stop_timeout", None)) is not None:
        if stop_timeout < 0:
            raise ValueError(f"--stop-timeout {stop_timeout:g}: give seconds >= 0")
        stop["stop_timeout_s"] = stop_timeout
    if args.launcher == "local":
        from pdserve.launch.local_backend import LocalBackend

        ray_resources.check_not_ray(args)
        return LocalBackend(log_level=args.log_level, start_timeout_s=args.ready_timeout, **stop)
    if args.launcher == "ray":
        resources = ray_resources.role_resources(args)  # bad JSON fails before Ray starts
        from pdserve.launch.ray import RayBackend

        return RayBackend(args.ray_address, resources, args.log_level, args.ready_timeout, **stop)
    raise ValueError(f"unknown launcher {args.launcher!r}")


def build_supervisor(args: argparse.Namespace, backend: Backend) -> Supervisor:
    """A supervisor for ``serve``'s options over ``backend``."""
    want = targets(args)
    if min(want.values()) < 0 or (want["mixed"] < 1 and min(want["prefill"], want["decode"]) < 1):
        raise ValueError(f"{args.mode} mode needs at least one worker of each kind, got {want}")
    secret = os.environ.get("PDSERVE_CLUSTER_SECRET") or secrets.token_hex(16)
    env = {"PDSERVE_CLUSTER_SECRET": secret}
    shared = worker_args(args)
    num_workers = sum(want.values())
    threads = args.threads_per_worker or max((os.cpu_count() or 1) // num_workers, 1)
    if getattr(args, "planner", "none") == "slo":  # every worker the planner starts gets the same share
        threads = planner_options.start_threads(args, num_workers)

    def make_spec(worker_id: str, role: str, router: str) -> WorkerSpec:
        return WorkerSpec(
            worker_id=worker_id,
            role=role,
            args=["--role", role, "--router", router, "--worker-id", worker_id, "--threads", str(threads),
                  "--metrics-port", "0", *shared],
            threads=threads,
            env=env,
        )

    config = SupervisorConfig(
        targets=want,
        router_args=router_args(args),
        port=args.port,
        env=env,
        secret=secret,
        api_key=os.environ.get("PDSERVE_API_KEY", "").split(",")[0].strip(),
        launcher=args.launcher,
        ready_timeout_s=args.ready_timeout,
        allow_flips=_flips_keep_placement(args),
    )
    return Supervisor(config, backend, make_spec)


def _flips_keep_placement(args: argparse.Namespace) -> bool:
    """Role flips move no process: allow them only where every role may run on the same nodes."""
    placements = {getattr(args, f"{role}_resources", None) or "" for role in ("prefill", "decode", "mixed")}
    return len(placements) == 1


def with_thread_scaling(planner: PlannerConfig, args: argparse.Namespace, counts: list[int]) -> PlannerConfig:
    """``planner`` with the thread-scaling table measured now, before any worker starts (the
    machine is quiet); without one (a GPU, a failure) the workers keep their threads."""
    print(f"measuring {args.model}'s speed at {', '.join(map(str, counts))} threads for the planner ...",
          flush=True)
    table = thread_scaling.measure(worker_args(args), counts)
    if table is None:
        print("no thread-scaling table: the planner keeps each worker's threads", flush=True)
        return planner
    for t, s in sorted(table.speeds.items()):
        print(f"  {t} thread(s): prefill {s.prefill_tps:.0f} tokens/s, decode step {s.step_s * 1e3:.1f} ms "
              f"+ {s.per_seq_s * 1e3:.2f} ms per sequence", flush=True)
    return dataclasses.replace(planner, thread_scaling=table)


def run_serve(args: argparse.Namespace) -> int:
    """Start, print the ready line, supervise until a signal; returns the exit code."""
    args.mixed = targets(args)["mixed"]  # the mode's default when not given
    try:
        planner = planner_options.planner_config(args) if getattr(args, "planner", "none") == "slo" else None
        supervisor = build_supervisor(args, make_backend(args))
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    runner: PlannerRunner | None = None
    if planner is not None and (counts := planner_options.thread_counts(args)):
        planner = with_thread_scaling(planner, args, counts)
    try:
        supervisor.stop_on_signals()
        supervisor.start()
        if supervisor.stopping:
            return 0
        print(f"pdserve is ready: {supervisor.url}/v1  ({args.model}, {args.mode}; Ctrl-C stops)", flush=True)
        if planner is not None:
            runner = PlannerRunner(lambda: supervisor.url, planner, interval_s=args.interval,
                                   window_s=planner_options.window_s(args), secret=supervisor.config.secret,
                                   api_key=supervisor.config.api_key).start()
        return supervisor.run()
    except (RuntimeError, TimeoutError) as exc:
        logger.error("%s", exc)
        print(f"error: {exc}", flush=True)
        return 1
    finally:
        if runner is not None:
            runner.stop()
        supervisor.close()
