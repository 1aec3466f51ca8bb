"""S3's configurations: the deployments whose goodput is compared, on the same 2 cores.

``agg`` (1 mixed worker × 2 threads), ``agg2`` (2 mixed × 1 thread), ``disagg`` (1 prefill +
1 decode × 1 thread) are started by :class:`LocalLauncher`; ``planner`` is ``pdserve serve
--planner slo`` (:data:`PLANNER_SERVE`), started by ``ServeLauncher``.
"""

from __future__ import annotations

import argparse

from common import Setup

from pdserve.launch.local import LaunchConfig

MODEL = "bench-50m"


#: The planner's deployment (``pdserve serve``; the SLO of the run is appended): the 2-core budget, the
#: planner choosing the workers and their threads, started as agg2, re-planned every 5 s.
PLANNER_SERVE = ["--model", MODEL, "--mode", "aggregated", "--mixed", "2", "--planner", "slo",
                 "--max-cores", "2", "--interval", "5", "--ready-timeout", "600"]
PLANNER_DESCRIPTION = ("planner: pdserve serve --planner slo --max-cores 2 (it chooses the workers and their "
                       "threads), started as agg2, re-planned every 5 s against this run's SLO, kept running "
                       "across the rates")


def setups(args: argparse.Namespace) -> dict[str, Setup]:
    """The configurations, keyed agg, agg2, disagg (``planner`` is started by ``ServeLauncher``)."""
    worker = ["--model", MODEL, "--chunk-size", str(args.chunk_size), "--no-prefix-caching"]
    router = ["--model", MODEL, "--lease", str(args.lease), "--disagg-policy", args.disagg_policy]

    def launch(mode: str, threads: int, num_prefill: int = 0, num_decode: int = 0, num_mixed: int = 0
               ) -> LaunchConfig:
        return LaunchConfig(mode=mode, num_prefill=num_prefill, num_decode=num_decode, num_mixed=num_mixed,
                            port=0, router_args=router, worker_args=worker, threads_per_worker=threads,
                            ready_timeout_s=300)

    chunk = f"chunked prefill (chunk {args.chunk_size})"
    return {
        "agg": Setup("agg", f"aggregated, 1 mixed worker × 2 threads, {chunk}",
                     launch("aggregated", 2, num_mixed=1)),
        "agg2": Setup("agg2", f"aggregated, 2 mixed workers × 1 thread, {chunk}",
                      launch("aggregated", 1, num_mixed=2)),
        "disagg": Setup("disagg", f"disaggregated, 1 prefill + 1 decode worker × 1 thread, {chunk}",
                        launch("disaggregated", 1, num_prefill=1, num_decode=1)),
        "planner": Setup("planner", PLANNER_DESCRIPTION, launch("aggregated", 1, num_mixed=2)),
    }
