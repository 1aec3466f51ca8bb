"""Per-role Ray resources (``--prefill-resources`` ...) and the node-specific host id; no Ray needed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pdserve.errors import ConfigError
from pdserve.launch.ray_resources import actor_options, check_feasible, parse_resources
from pdserve.transfer.base import choose_transport
from pdserve.transfer.descriptor import KVDescriptor, KVLayout


def test_custom_and_builtin_resources_parse() -> None:
    assert parse_resources('{"prefill_node": 1}', "--prefill-resources") == {"prefill_node": 1.0}
    assert parse_resources('{"GPU": 1, "CPU": 2}', "--decode-resources") == {"num_gpus": 1.0, "num_cpus": 2.0}
    parsed = parse_resources('{"num_gpus": 0.5, "accelerator_type": "H100", "memory": 1e9}', "--x")
    assert parsed == {"num_gpus": 0.5, "accelerator_type:H100": 0.001, "memory": 1e9}
    assert parse_resources(None, "--x") == {} and parse_resources("  ", "--x") == {}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{prefill_node: 1}", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"gpus": 1}', "did you mean 'num_gpus'"),
        ('{"num_gpu": 1}', "did you mean 'num_gpus'"),
        ('{"num_nodes": 1}', "unknown key 'num_nodes'"),
        ('{"prefill_node": "one"}', "must be a number"),
        ('{"prefill_node": true}', "must be a number"),
        ('{"prefill_node": -1}', "must be > 0"),
        ('{"prefill_node": 0}', "must be > 0"),
        ('{"num_gpus": -1}', "must be ≥ 0"),
        ('{"accelerator_type": 3}', "accelerator_type must be a name"),
    ],
)
def test_bad_resources_say_what_is_wrong(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match="--decode-resources") as info:
        parse_resources(text, "--decode-resources")
    assert needle in str(info.value)


def test_actor_options_hold_no_cpu_unless_asked() -> None:
    assert actor_options({}) == {"num_cpus": 0.0}
    assert actor_options({"prefill_node": 1.0, "num_gpus": 1.0}) == {
        "num_cpus": 0.0, "num_gpus": 1.0, "resources": {"prefill_node": 1.0}
    }
    assert actor_options({"num_cpus": 2.0, "memory": 5.0}) == {"num_cpus": 2.0, "memory": 5.0}


def test_infeasible_resources_fail_at_start_not_hang() -> None:
    nodes = [{"CPU": 1.0, "prefill_node": 1.0}, {"CPU": 1.0, "decode_node": 2.0}]
    check_feasible("prefill", {"prefill_node": 1.0}, nodes)
    check_feasible("decode", {"decode_node": 2.0, "num_cpus": 1.0}, nodes)
    check_feasible("mixed", {}, nodes)
    with pytest.raises(ConfigError, match="no node has 'decod_node'"):
        check_feasible("decode", {"decod_node": 1.0}, nodes)
    with pytest.raises(ConfigError, match="no single node has all of it"):
        check_feasible("decode", {"decode_node": 1.0, "prefill_node": 1.0}, nodes)
    with pytest.raises(ConfigError, match="'GPU'"):
        check_feasible("decode", {"num_gpus": 1.0}, nodes)


def _host_id_with(env_value: str | None) -> str:
    env = {"PATH": "/usr/bin:/bin"}
    if env_value is not None:
        env["PDSERVE_HOST_ID"] = env_value
    code = "from pdserve.transfer.base import host_id; print(host_id())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_host_id_override_makes_simulated_nodes_pair_over_tcp() -> None:
    """The Ray launcher sets PDSERVE_HOST_ID to the Ray node id: one machine, two 'hosts'."""
    node_a, node_b = _host_id_with("ray-node-a"), _host_id_with("ray-node-b")
    assert (node_a, node_b) == ("ray-node-a", "ray-node-b")
    assert _host_id_with(None) not in (node_a, node_b)
    layout = KVLayout(2, 8, 16, 2, 8, "float32")
    receiver_on_a = KVDescriptor("shm", "tcp://127.0.0.1:1", node_a, layout, "pdserve-kv-1-ab")
    assert choose_transport(node_a, receiver_on_a) == "shm"
    assert choose_transport(node_b, receiver_on_a) == "tcp"


def _serve(*args: str, block_ray: bool = False) -> subprocess.CompletedProcess[str]:
    """``pdserve serve ARGS`` in a subprocess (with ``import ray`` failing when ``block_ray``)."""
    code = ("import sys\n"
            + ("sys.modules['ray'] = None\n" if block_ray else "")
            + "from pdserve.cli import main\nsys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, "serve", *args], capture_output=True, text=True,
                          timeout=60)


def test_launcher_ray_without_ray_says_how_to_install() -> None:
    result = _serve("--launcher", "ray", block_ray=True)
    assert result.returncode == 2
    assert "pip install -e '.[ray]'" in result.stderr + result.stdout


def test_bad_resources_fail_before_anything_starts() -> None:
    result = _serve("--launcher", "ray", "--decode-resources", '{"decode_node": 1', block_ray=True)
    assert result.returncode == 2
    assert "--decode-resources: not valid JSON" in result.stdout + result.stderr
    result = _serve("--prefill-resources", '{"prefill_node": 1}')
    assert result.returncode == 2
    assert "only apply to --launcher ray" in result.stdout + result.stderr



def test_an_address_with_no_ray_cluster_fails_at_once() -> None:
    """Ray itself would retry an unreachable GCS for minutes."""
    pytest.importorskip("ray", reason="needs Ray: pip install -e '.[ray]'")
    from pdserve.launch.local import free_port

    result = _serve("--launcher", "ray", "--ray-address", f"127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "no Ray cluster answers there" in result.stdout + result.stderr
