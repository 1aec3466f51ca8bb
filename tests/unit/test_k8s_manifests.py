"""The Kubernetes manifests of docs/deploy.md: schema-valid, and consistent with each other and the CLI.

Built-in kinds are validated against the Kubernetes API schemas bundled by
``kubernetes-validate`` (offline); KubeRay's RayCluster/RayJob have no bundled
schema, so their pod templates are validated as ``PodTemplate`` objects and
the rest is checked here by hand. Every ``pdserve`` command line in them is
parsed by pdserve's own argument parser.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from pdserve.cli import _build_parser
from pdserve.launch.ray_resources import parse_resources

K8S_DIR = Path(__file__).resolve().parents[2] / "docs" / "k8s"


def load() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(name, pod template) of every Deployment and every RayCluster group."""
    out = [(d["metadata"]["name"], d["spec"]["template"]) for d in by_kind(docs, "Deployment")]
    for rc in by_kind(docs, "RayCluster"):
        out.append((f"{rc['metadata']['name']}-head", rc["spec"]["headGroupSpec"]["template"]))
        out += [(f"{rc['metadata']['name']}-{g['groupName']}", g["template"])
                for g in rc["spec"]["workerGroupSpecs"]]
    return out


def pdserve_argv(container: dict[str, Any]) -> list[str]:
    """The container's pdserve arguments, with $(VAR) references filled with a placeholder."""
    argv = [*container.get("command", []), *container.get("args", [])]
    assert argv[0] == "pdserve", argv
    return [re.sub(r"\$\((\w+)\)", "x", a) for a in argv[1:]]


def test_manifests_match_the_kubernetes_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate (dev extra)")
    version = kv.latest_version()
    docs = load()
    for doc in docs:
        if doc["apiVersion"].startswith("ray.io/"):
            continue
        kv.validate(doc, version, strict=True)
    for name, template in pod_specs(docs):
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
                        "template": template}
        kv.validate(pod_template, version, strict=True)


def test_every_pdserve_command_line_parses() -> None:
    parser, _ = _build_parser()
    docs = load()
    for _, template in pod_specs(docs):
        for container in template["spec"]["containers"]:
            if container.get("command", [""])[0] == "pdserve":
                parser.parse_args(pdserve_argv(container))
    for job in by_kind(docs, "RayJob"):
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[0] == "pdserve"
        args = parser.parse_args(argv[1:])
        assert args.launcher == "ray"


def test_cross_references_hold() -> None:
    docs = load()
    secrets = {s["metadata"]["name"]: set(s["stringData"]) for s in by_kind(docs, "Secret")}
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    parser, _ = _build_parser()
    routers = []
    for name, template in pod_specs(docs):
        for container in template["spec"]["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets.get(ref["name"], set()), (name, ref)
            port_names = {p["name"] for p in container.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                get = container.get(probe, {}).get("httpGet")
                if get:
                    assert get["port"] in port_names, (name, probe)
                    assert get["path"] in ("/ready", "/live", "/health"), (name, get)
            if container.get("command", [""])[0] != "pdserve":
                continue
            args = parser.parse_args(pdserve_argv(container))
            if args.command == "router":
                routers.append((template, args))
                assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
            if args.command == "worker":
                host, port = args.router.removeprefix("tcp://").split(":")
                service = services[host]
                assert int(port) in {p["port"] for p in service["spec"]["ports"]}, args.router
                probe = " ".join(container["livenessProbe"]["exec"]["command"])
                assert f"127.0.0.1:{args.metrics_port}/metrics" in probe
                assert args.kv_host == "0.0.0.0" and args.kv_advertise_host
    assert len(routers) == 1
    template, args = routers[0]
    service = services["pdserve-router"]
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
    assert ports == {"http": args.port, "control": args.control_port}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)


def test_ray_job_asks_for_the_resources_the_groups_advertise() -> None:
    docs = load()
    (cluster,) = by_kind(docs, "RayCluster")
    (job,) = by_kind(docs, "RayJob")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    advertised: dict[str, set[str]] = {}
    for group in cluster["spec"]["workerGroupSpecs"]:
        text = json.loads(group["rayStartParams"]["resources"])  # KubeRay wants a quoted JSON string
        advertised[group["groupName"]] = set(json.loads(text))
    parser, _ = _build_parser()
    args = parser.parse_args(shlex.split(job["spec"]["entrypoint"])[1:])
    for role in ("prefill", "decode"):
        wanted = parse_resources(getattr(args, f"{role}_resources"), role)
        assert set(wanted) <= advertised[role], (role, wanted, advertised)
    api = next(s for s in by_kind(docs, "Service") if s["spec"]["selector"].get("ray.io/cluster"))
    head_ports = {p["name"]: p["containerPort"]
                  for p in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert head_ports[api["spec"]["ports"][0]["targetPort"]] == args.port
    assert args.host == "0.0.0.0"
