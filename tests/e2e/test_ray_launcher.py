"""``pdserve serve --launcher ray`` on a multi-node Ray cluster simulated on this machine.

The cluster: a head node with ``prefill_node`` and two nodes with
``decode_node`` (``ray.cluster_utils.Cluster``: real raylets, one IP). The
deployment is started as a user starts it, with per-role resources; the test
checks where each worker landed (through ``/pdserve/workers``), that the
cross-node pairs moved KV over tcp, that greedy outputs equal the offline
engine's (which the local launcher's tests hold it to), that losing a decode
node mid-stream is survived and its worker replaced once a node with room
joins, that a SIGKILLed worker is replaced on the node it had to free, that
``/pdserve/scale`` drains a worker away, and that nothing is left
running after SIGINT.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import WORKER_ARGS
from test_chaos import one_request
from test_serve_cli import alive

from pdserve import LLM, SamplingParams
from pdserve.launch.local import free_port

# Ray's switch for single-machine clusters: every node's IP is 127.0.0.1, so all traffic (Ray's and
# pdserve's, which binds 0.0.0.0 and advertises the node IP) stays on loopback. Read at import.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
pytest.importorskip("ray", reason="the Ray launcher's test needs Ray: pip install -e '.[ray]'")
from ray.cluster_utils import Cluster

pytestmark = pytest.mark.slow

NODE_ARGS: dict[str, Any] = {"num_cpus": 1, "object_store_memory": 80 << 20}
PROMPTS = ["The KV cache moves between Ray nodes", "Hello", "a b c d e f g h i j k l m n o p"]
STREAM_TOKENS = 400
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Head (prefill_node) + two decode_node nodes; shut down through Ray's own API."""
    c = Cluster(initialize_head=True, head_node_args={**NODE_ARGS, "include_dashboard": False,
                                                      "resources": {"prefill_node": 1}})
    try:
        for _ in range(2):
            c.add_node(**NODE_ARGS, resources={"decode_node": 1})
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()


def deployment(url: str) -> dict[str, Any]:
    reply = httpx.get(f"{url}/pdserve/workers", timeout=10).json()
    return reply


def slots(url: str) -> dict[str, dict[str, Any]]:
    return {s["worker_id"]: s for s in deployment(url)["deployment"]["workers"]}


def wait_for(what: str, check: Any, timeout_s: float = TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def complete(url: str, prompt: str, max_tokens: int) -> str:
    reply = httpx.post(f"{url}/v1/completions", timeout=TIMEOUT_S, json={
        "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["text"])


def test_ray_launcher_places_roles_pairs_over_tcp_and_survives_a_lost_node(cluster: Cluster) -> None:
    offline = LLM("tiny", chunk_size=32, block_size=16, kv_cache_bytes=64 << 20)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    reference = [o.text for o in offline.generate(PROMPTS, params)]
    long_params = SamplingParams(max_tokens=STREAM_TOKENS, temperature=0.0, ignore_eos=True)
    long_reference = offline.generate(["stream on"], long_params)[0].text

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdserve", "serve", "--launcher", "ray", "--ray-address", cluster.address,
         "--port", str(port), "--prefill", "1", "--decode", "2", "--threads-per-worker", "1",
         "--disagg-policy", "always",  # short prompts too: every request moves KV
         "--prefill-resources", '{"prefill_node": 1}', "--decode-resources", '{"decode_node": 1}',
         "--ready-timeout", "150", "--worker-args", *WORKER_ARGS],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            if line.startswith("pdserve is ready"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    pids: set[int] = set()
    try:
        assert ready.wait(180), "not ready:\n" + "".join(output[-40:])

        # 1. Each worker landed on a node with its role's resource; the decode workers on two nodes.
        decode_nodes = {n.node_id for n in cluster.worker_nodes}  # the head has prefill_node only
        placed = wait_for("placements", lambda: (s := slots(url)) and all(x["node_id"] for x in s.values())
                          and s)
        assert placed["prefill-0"]["node_id"] == cluster.head_node.node_id
        for wid in ("decode-0", "decode-1"):
            assert placed[wid]["node_id"] in decode_nodes, placed[wid]
            assert placed[wid]["host"] == "127.0.0.1" and placed[wid]["pid"]  # the node IP: loopback here
        assert placed["decode-0"]["node_id"] != placed["decode-1"]["node_id"]
        argv = Path(f"/proc/{placed['decode-0']['pid']}/cmdline").read_bytes().decode().split("\0")
        router_endpoint = argv[argv.index("--router") + 1]  # the control endpoint the router advertised
        assert router_endpoint.startswith(f"tcp://{placed['decode-0']['host']}:"), router_endpoint
        pids |= {s["pid"] for s in placed.values()}

        # 2. Greedy outputs equal the offline engine's; every pair is cross-node, so KV went over tcp.
        for prompt, expected in zip(PROMPTS, reference, strict=True):
            assert complete(url, prompt, 24) == expected
        stats = {w["worker_id"]: w["stats"] for w in deployment(url)["workers"]}
        assert stats["prefill-0"]["transports"] == ["tcp"]
        assert stats["prefill-0"]["kv_transfers"] >= len(PROMPTS)

        # 3. Lose a decode node while streams run on it: they finish, unchanged. (The router and
        # pdserve serve's own Ray connection are on the head node, which stays.)
        results: list[tuple[str, str]] = []

        def stream() -> None:
            results.append(one_request(url, "stream on", STREAM_TOKENS))

        streams = [threading.Thread(target=stream) for _ in range(4)]
        for t in streams:
            t.start()
        # The victim is a decode worker that runs streams (the router spreads them, see
        # test_placement's unmeasured-worker test, but which one gets more is its choice).
        busy = wait_for("a stream on a decode worker", lambda: sorted(
            w["worker_id"] for w in deployment(url)["workers"]
            if w["worker_id"].startswith("decode-") and w["num_inflight"] > 0), 60)
        victim = busy[-1]
        survivor = "decode-0" if victim == "decode-1" else "decode-1"
        node = next(n for n in cluster.worker_nodes if n.node_id == placed[victim]["node_id"])
        cluster.remove_node(node)
        for t in streams:
            t.join(TIMEOUT_S)
        assert results == [("ok", long_reference)] * 4
        assert deployment(url)["recovery"]["num_migrations"] >= 1

        # 4. Its replacement waits for a node with decode_node, then runs there.
        new_node = cluster.add_node(**NODE_ARGS, resources={"decode_node": 1})
        replaced = wait_for("the replacement", lambda: (s := slots(url).get(victim)) and s["state"] == "ready"
                            and s["node_id"] == new_node.node_id and s)
        pids.add(replaced["pid"])
        assert complete(url, PROMPTS[0], 24) == reference[0]

        # 5. A worker process killed on its node: its actor ends, frees prefill_node (the head has
        # one), and the replacement runs there.
        os.kill(placed["prefill-0"]["pid"], signal.SIGKILL)
        again = wait_for("prefill-0's replacement", lambda: (s := slots(url)["prefill-0"])["state"] == "ready"
                         and s["pid"] != placed["prefill-0"]["pid"] and s)
        assert again["node_id"] == cluster.head_node.node_id
        pids.add(again["pid"])
        assert complete(url, PROMPTS[2], 24) == reference[2]

        # 6. Scaling works the same on Ray: one decode worker is drained, its actor's process ends.
        reply = httpx.post(f"{url}/pdserve/scale", json={"decode": 1}, timeout=10)
        assert reply.status_code == 200, reply.text
        left = wait_for("the scale-down", lambda: len(s := [x for x in slots(url).values()
                                                          if x["role"] == "decode"]) == 1 and s)
        gone = {placed[survivor]["pid"], replaced["pid"]} - {left[0]["pid"]}
        wait_for("the drained worker's process to end", lambda: not any(alive(p) for p in gone), 60)
        assert complete(url, PROMPTS[1], 24) == reference[1]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(output[-40:])
    wait_for("every worker process to end", lambda: not any(alive(p) for p in pids), 30)
    assert not [n for n in os.listdir("/dev/shm") if any(n.startswith(f"pdserve-kv-{p}-") for p in pids)]


def test_ray_backend_directly(cluster: Cluster) -> None:
    """The backend alone: prefill and decode on one Ray node pair over shm; what a worker's process
    is started with; infeasible resources; a process that exits; a kill; an actor with no node."""
    from pdserve.errors import ConfigError
    from pdserve.launch.base import WorkerSpec
    from pdserve.launch.ray import RayBackend

    node = cluster.add_node(**NODE_ARGS, resources={"pair_node": 2})
    backend = RayBackend(cluster.address, {"prefill": {"pair_node": 1},
                                           "decode": {"pair_node": 1, "num_cpus": 1}})
    try:
        with pytest.raises(ConfigError, match="no node has 'gpu_node'"):
            RayBackend(cluster.address, {"prefill": {"gpu_node": 1}})
        env = {"PDSERVE_CLUSTER_SECRET": "pair-secret"}
        router = backend.start_router(["--model", "tiny", "--port", "0", "--control-port", "0",
                                       "--disagg-policy", "always"], env)

        def worker(wid: str, role: str, *args: str, resources: dict[str, float] | None = None) -> Any:
            return backend.start_worker(WorkerSpec(wid, role, ["--role", role, *args], threads=3, env=env,
                                                   resources=resources or {}))

        prefill, decode = (worker(f"{role}-0", role, "--router", router.control_endpoint, "--worker-id",
                                  f"{role}-0", *WORKER_ARGS) for role in ("prefill", "decode"))
        broken = worker("broken", "decode", "--model", "/nonexistent/model", resources={"decode_node": 1})
        nowhere = worker("nowhere", "decode", resources={"prefill_node": 5})  # no node has 5: never placed

        # 1. Both on the pair node; KV between them goes through shared memory.
        wait_for("both workers", lambda: len(deployment(router.url)["workers"]) == 2)
        assert {prefill.placement().node_id, decode.placement().node_id} == {node.node_id}
        offline = LLM("tiny", chunk_size=32, block_size=16, kv_cache_bytes=64 << 20)
        expected = offline.generate([PROMPTS[0]], SamplingParams(max_tokens=24, temperature=0.0,
                                                                 ignore_eos=True))[0].text
        assert complete(router.url, PROMPTS[0], 24) == expected
        stats = {w["worker_id"]: w["stats"] for w in deployment(router.url)["workers"]}
        assert stats["prefill-0"]["transports"] == ["shm"] and stats["prefill-0"]["kv_transfers"] >= 1

        # 2. The decode process: one thread per reserved CPU (not the spec's 3), KV on 0.0.0.0 advertised
        # at the node IP, the Ray node as its host id.
        place = decode.placement()
        argv = Path(f"/proc/{place.pid}/cmdline").read_bytes().split(b"\0")
        environ = Path(f"/proc/{place.pid}/environ").read_bytes().split(b"\0")
        assert argv[-7:-1] == [b"--threads", b"1", b"--kv-host", b"0.0.0.0", b"--kv-advertise-host",
                               place.host.encode()]
        assert b"OMP_NUM_THREADS=1" in environ
        assert b"PDSERVE_HOST_ID=ray-node-" + node.node_id.encode() in environ

        # 3. A process that cannot start ends with an error code; an unplaced actor is removed on terminate.
        assert wait_for("the broken worker's exit", lambda: broken.poll() is not None, 60)
        assert broken.poll() not in (0, None)
        assert nowhere.poll() is None and nowhere.placement().host == ""
        nowhere.terminate()
        assert wait_for("the unplaced actor's removal", lambda: nowhere.poll() is not None, 30)

        # 4. kill: the process and its actor end now.
        decode.kill()
        assert wait_for("the kill", lambda: decode.poll() is not None, 30) and decode.poll() < 0
        wait_for("the killed process to end", lambda: not alive(place.pid), 30)
    finally:
        backend.close()
        cluster.remove_node(node)
