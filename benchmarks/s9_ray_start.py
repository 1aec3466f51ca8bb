"""S9 (Ray part) — how long ``pdserve serve --launcher ray`` takes to be ready, vs the local launcher.

The Ray side runs on a 3-node Ray cluster simulated on this machine
(``ray.cluster_utils.Cluster``: a head with ``prefill_node``, two nodes with
``decode_node``; real raylets sharing one IP), started once before the
measured runs and shut down through Ray's API after them. Each measured run is
the command a user types, timed from its start to its "pdserve is ready" line
and then to the first completed request:

  local: ``pdserve serve --prefill 1 --decode 2`` (child processes)
  ray:   the same plus ``--launcher ray --ray-address <cluster>
         --prefill-resources '{"prefill_node": 1}' --decode-resources '{"decode_node": 1}'``

The two alternate (local, ray, local, ray, ...) ``--repeats`` times; each run
is stopped with SIGINT and waited for before the next. The cluster's own
start-up time is reported apart (a real cluster is already running when a user
starts pdserve on it).

    python benchmarks/s9_ray_start.py [--repeats 3] [--output benchmarks/results/s9_ray_start.json]

Every process shares the machine's cores; the load average is recorded.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from common import RESULTS_DIR, machine_info, ratio, write_json

from pdserve.launch.local import free_port

WORKER_ARGS = ["--model", "tiny", "--kv-cache-mib", "64"]
NODE_ARGS: dict[str, Any] = {"num_cpus": 1, "object_store_memory": 80 << 20}
READY_TIMEOUT_S = 300


def start_cluster() -> tuple[Any, float]:
    """Head (prefill_node) + two decode_node nodes; returns it and its start-up time in seconds.

    Every node's IP is 127.0.0.1 (Ray's single-machine switch, read when Ray is
    imported, and inherited by pdserve serve), so no traffic leaves loopback.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray.cluster_utils import Cluster

    start = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={**NODE_ARGS, "include_dashboard": False,
                                                            "resources": {"prefill_node": 1}})
    for _ in range(2):
        cluster.add_node(**NODE_ARGS, resources={"decode_node": 1})
    cluster.wait_for_nodes()
    return cluster, time.perf_counter() - start


def serve_once(extra: list[str]) -> dict[str, float]:
    """Start ``pdserve serve EXTRA``; seconds to its ready line, to a first completion, and to stop."""
    port = free_port()
    cmd = [sys.executable, "-m", "pdserve", "serve", "--port", str(port), "--prefill", "1", "--decode", "2",
           "--threads-per-worker", "1", "--ready-timeout", str(READY_TIMEOUT_S), *extra,
           "--worker-args", *WORKER_ARGS]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ready = threading.Event()
    tail: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail[:] = [*tail[-30:], line]
            if line.startswith("pdserve is ready"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(READY_TIMEOUT_S):
            raise RuntimeError("not ready:\n" + "".join(tail))
        ready_s = time.perf_counter() - start
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": "Hello", "max_tokens": 8, "temperature": 0})
        reply.raise_for_status()
        first_s = time.perf_counter() - start
    finally:
        stop_start = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {"ready_s": ready_s, "first_completion_s": first_s, "stop_s": time.perf_counter() - stop_start}


def summary(runs: list[dict[str, float]]) -> dict[str, Any]:
    keys = runs[0].keys()
    return {k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs),
                "max": max(r[k] for r in runs)} for k in keys}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each launcher (alternating)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "s9_ray_start.json")
    args = parser.parse_args()
    before = machine_info()
    cluster, cluster_s = start_cluster()
    print(f"simulated 3-node Ray cluster up in {cluster_s:.1f} s at {cluster.address}", flush=True)
    ray_args = ["--launcher", "ray", "--ray-address", cluster.address,
                "--prefill-resources", '{"prefill_node": 1}', "--decode-resources", '{"decode_node": 1}']
    runs: dict[str, list[dict[str, float]]] = {"local": [], "ray": []}
    try:
        for i in range(args.repeats):
            for name, extra in (("local", []), ("ray", ray_args)):
                run = serve_once(extra)
                runs[name].append(run)
                print(f"[{i + 1}/{args.repeats}] {name:5s} ready {run['ready_s']:.1f} s, first completion "
                      f"{run['first_completion_s']:.1f} s, stop {run['stop_s']:.1f} s", flush=True)
    finally:
        cluster.shutdown()
    med = {name: summary(r) for name, r in runs.items()}
    ray_over_local = ratio(med["ray"]["ready_s"]["median"], med["local"]["ready_s"]["median"])
    result: dict[str, Any] = {
        "scenario": "S9-ray-start",
        "machine": before,
        "load_avg_after": list(os.getloadavg()),
        "deployment": "1 prefill + 2 decode workers, tiny model",
        "cluster": {"nodes": 3, "start_s": cluster_s, "resources": ["head: prefill_node", "2 × decode_node"]},
        "runs": runs,
        "summary": med,
        "ray_over_local_ready": ray_over_local,
    }
    path = write_json(args.output, result)
    print(f"ready (median): local {med['local']['ready_s']['median']:.1f} s, ray "
          f"{med['ray']['ready_s']['median']:.1f} s ({ray_over_local:.2f}×); wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
