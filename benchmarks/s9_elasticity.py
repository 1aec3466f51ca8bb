"""S9 — elasticity of a supervised deployment (``pdserve serve`` + ``pdserve scale``), over HTTP only.

Starts ``pdserve serve --launcher L --policy round_robin --trace-responses``
(the tiny model unless ``--model``) with one prefill and one decode worker,
and measures, ``--reps`` times each:

* **death → replacement serving**: SIGKILL the only decode worker (then, in
  another round, the only prefill worker); a client sends a short request
  every 50 ms; the figure is the time from the kill to the end of the first
  request whose trace names the replacement (same worker id, new process).
* **scale → new worker's first request**: ``POST /pdserve/scale`` (what
  ``pdserve scale`` sends) adding one decode worker (a new process); the time
  until a request routed to it (its id in the trace) has been answered.
* **role flip vs new process**: with two decode workers and one prefill
  worker, scale to two prefill and one decode worker (the supervisor flips a
  decode worker: drain, rebuild engine and KV for the new role with the same
  weights, register again); the time until a request is prefilled by the
  flipped worker. Compared with adding a prefill worker as a new process, the
  same way (scale → its first request).
* **failed requests during scale-down under load**: 16 clients stream
  completions in a loop while the deployment goes from 2+2 to 1+1 workers;
  every request that is not a complete 200 stream counts (target: 0).

The machine is shared: ``load_avg_1_5_15min`` is recorded before and after;
absolute times include other jobs' CPU use; flip and new-process times are
measured in the same run, side by side.

    python benchmarks/s9_elasticity.py [--reps 3] [--quick] [--launcher local] [--model tiny]

``--launcher`` picks the backend of ``pdserve serve`` (the Ray launcher adds
its own choice and its start-time figure here: see ``LAUNCHERS``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from common import RESULTS_DIR, machine_info, ratio, write_json

from pdserve.launch.local import free_port

#: Launchers this script can drive (``pdserve serve --launcher``); the Ray launcher adds "ray".
LAUNCHERS = ("local",)
TIMEOUT_S = 300.0
PROBE_INTERVAL_S = 0.05


class Deployment:
    """A ``pdserve serve`` child and HTTP helpers against it."""

    def __init__(self, args: argparse.Namespace, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "pdserve", "serve", "--launcher", args.launcher, "--model", args.model,
               "--port", str(self.port), "--prefill", "1", "--decode", "1", "--policy", "round_robin",
               "--trace-responses", "--threads-per-worker", "1", "--worker-args", "--kv-cache-mib", "64"]
        self.started_s = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        self.client = httpx.Client(timeout=60.0)
        while True:  # ready means ready: /v1/models answers 200 once a request can be served
            self._alive()
            try:
                if self.client.get(f"{self.url}/v1/models").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.start_s = time.monotonic() - self.started_s

    def _alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"pdserve serve exited with code {self.proc.returncode}")
        if time.monotonic() - self.started_s > 10 * TIMEOUT_S:
            raise TimeoutError("the benchmark ran out of time")

    def view(self) -> dict[str, Any]:
        data: dict[str, Any] = self.client.get(f"{self.url}/pdserve/workers?stats=false").json()
        return data

    def slots(self) -> dict[str, dict[str, Any]]:
        return {w["worker_id"]: w for w in self.view()["deployment"]["workers"]}

    def scale(self, **targets: int) -> float:
        """Post new targets; returns when they were posted (monotonic)."""
        t0 = time.monotonic()
        reply = self.client.post(f"{self.url}/pdserve/scale", json=targets)
        reply.raise_for_status()
        return t0

    def wait_shape(self, **shape: int) -> None:
        """Until every pool has ``shape``'s count of ready workers and nothing is moving."""
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            self._alive()
            dep = self.view()["deployment"]
            pools = dep["pools"]
            sized = all(pools[p]["actual"] == pools[p]["target"] == shape.get(p, 0) for p in pools)
            if sized and all(w["state"] == "ready" for w in dep["workers"]):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"not at {shape}: {dep}")
            time.sleep(0.1)

    def first_request_on(self, worker_id: str, side: str, since_s: float) -> float:
        """Seconds from ``since_s`` until a request routed to ``worker_id`` as ``side`` was answered."""
        body = {"model": "tiny", "prompt": "elastic", "max_tokens": 2, "ignore_eos": True, "temperature": 0}
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            self._alive()
            try:
                reply = self.client.post(f"{self.url}/v1/completions", json=body)
                if reply.status_code == 200:
                    events = reply.json()["pdserve_trace"][0]["events"]
                    routed = [e for e in events if e["event"] == "routed"][-1]
                    if routed.get(f"{side}_worker") == worker_id:
                        return time.monotonic() - since_s
            except (httpx.HTTPError, KeyError, IndexError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no request reached {worker_id} as {side}")
            time.sleep(PROBE_INTERVAL_S)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.client.close()


def death_to_serving(d: Deployment, role: str) -> float:
    """SIGKILL the only worker of ``role``; seconds until its replacement served a request."""
    d.wait_shape(prefill=1, decode=1)
    (wid, slot), = [(w, s) for w, s in d.slots().items() if s["role"] == role]
    t0 = time.monotonic()
    os.kill(slot["pid"], signal.SIGKILL)
    return d.first_request_on(wid, role, t0)


def scale_to_first_request(d: Deployment, role: str, **targets: int) -> tuple[float, str]:
    """Scale to ``targets``; seconds until the worker that joined ``role`` served a request (and its id)."""
    before = {w for w, s in d.slots().items() if s["role"] == role}
    t0 = d.scale(**targets)
    deadline = time.monotonic() + TIMEOUT_S
    while True:  # which worker joins the pool: a new slot, or a flipping one
        joined = [w for w, s in d.slots().items() if (s["flip_to"] or s["role"]) == role and w not in before]
        if joined:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"nobody joined {role}")
        time.sleep(0.02)
    return d.first_request_on(joined[0], role, t0), joined[0]


def scale_down_under_load(d: Deployment, clients: int) -> dict[str, Any]:
    """2+2 → 1+1 while ``clients`` stream in a loop; counts requests that did not complete."""
    d.scale(prefill=2, decode=2)
    d.wait_shape(prefill=2, decode=2)
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0}
    lock = threading.Lock()
    errors: list[str] = []

    def client(i: int) -> None:
        body = {"model": "tiny", "prompt": f"load {i}", "max_tokens": 48, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=120.0) as c:
            while not stop.is_set():
                ok, why = False, ""
                try:
                    with c.stream("POST", f"{d.url}/v1/completions", json=body) as r:
                        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
                        ok = r.status_code == 200 and lines[-1:] == ["data: [DONE]"] and not any(
                            '"error"' in ln for ln in lines)
                        why = f"status {r.status_code}" if r.status_code != 200 else "error event"
                except httpx.HTTPError as exc:
                    why = repr(exc)
                with lock:
                    counts["ok" if ok else "failed"] += 1
                    if not ok:
                        errors.append(why)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(3.0)  # everyone streaming
    t0 = d.scale(prefill=1, decode=1)
    d.wait_shape(prefill=1, decode=1)
    drained_s = time.monotonic() - t0
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join()
    return {"clients": clients, "requests_ok": counts["ok"], "requests_failed": counts["failed"],
            "scale_down_s": drained_s, "errors": errors[:10]}


def summary(values: list[float]) -> dict[str, Any]:
    return {"values_s": values, "median_s": statistics.median(values) if values else None,
            "min_s": min(values, default=None), "max_s": max(values, default=None)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="s9-") as tmp:
        log = Path(tmp) / "serve.log"
        d = Deployment(args, log)
        try:
            figures: dict[str, list[float]] = {k: [] for k in (
                "decode_death_to_serving", "prefill_death_to_serving", "scale_to_first_request_new_process",
                "flip_to_first_request", "new_prefill_process_to_first_request")}
            for rep in range(args.reps):
                print(f"rep {rep + 1}/{args.reps}", flush=True)
                figures["decode_death_to_serving"].append(death_to_serving(d, "decode"))
                figures["prefill_death_to_serving"].append(death_to_serving(d, "prefill"))
                d.wait_shape(prefill=1, decode=1)
                t, _ = scale_to_first_request(d, "decode", decode=2)  # a new decode process
                figures["scale_to_first_request_new_process"].append(t)
                d.wait_shape(prefill=1, decode=2)
                # One pool shrinks while another grows: a decode worker flips to prefill.
                t, flipped = scale_to_first_request(d, "prefill", prefill=2, decode=1)
                figures["flip_to_first_request"].append(t)
                d.wait_shape(prefill=2, decode=1)
                d.scale(prefill=1, decode=1)
                d.wait_shape(prefill=1, decode=1)
                t, _ = scale_to_first_request(d, "prefill", prefill=2)  # a new prefill process
                figures["new_prefill_process_to_first_request"].append(t)
                d.scale(prefill=1)
                d.wait_shape(prefill=1, decode=1)
                print({k: round(v[-1], 2) for k, v in figures.items()}, f"flipped {flipped}", flush=True)
            load = scale_down_under_load(d, args.clients)
            print(f"scale-down under load: {load}", flush=True)
            start_s = d.start_s
        except BaseException:
            print(log.read_text()[-4000:], file=sys.stderr)
            raise
        finally:
            d.stop()
    result = {k: summary(v) for k, v in figures.items()}
    flip, new = result["flip_to_first_request"]["median_s"], result["new_prefill_process_to_first_request"][
        "median_s"]
    return {
        "figures": result,
        "flip_vs_new_process": ratio(flip or float("nan"), new or float("nan")),
        "scale_down_under_load": load,
        "start_to_models_200_s": {args.launcher: start_s},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--launcher", default="local", choices=LAUNCHERS)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16, help="streaming clients during the scale-down")
    parser.add_argument("--quick", action="store_true", help="one repetition")
    parser.add_argument("--out", default=str(RESULTS_DIR / "s9_elasticity.json"))
    args = parser.parse_args()
    if args.quick:
        args.reps = 1
    machine_before = machine_info()
    result = run(args)
    out = {"scenario": "S9", "launcher": args.launcher, "model": args.model, "reps": args.reps,
           "machine": machine_info(), "load_avg_before": machine_before["load_avg_1_5_15min"], **result}
    path = write_json(Path(args.out), out)
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=1))
    print(f"wrote {path}")
    return 0 if result["scale_down_under_load"]["requests_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
