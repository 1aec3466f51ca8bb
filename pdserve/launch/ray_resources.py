"""Per-role Ray resources: parsing ``--prefill-resources '{...}'`` and checking them.

A role's resources are a JSON object, e.g. ``{"prefill_node": 1}`` or
``{"num_gpus": 1, "accelerator_type": "H100"}``:

- ``num_cpus``, ``num_gpus``, ``memory`` (bytes): Ray's actor options; ``CPU``
  and ``GPU`` are accepted as spellings of ``num_cpus`` and ``num_gpus``.
- ``accelerator_type``: a string (``"H100"``, ``"A100"``...); it becomes Ray's
  ``accelerator_type:<name>`` resource.
- any other key: a custom resource of the cluster's nodes (``ray start
  --resources '{"prefill_node": 4}'``), a number > 0.

Everything here is plain Python: it runs (and is tested) without Ray installed.
The result is a flat ``dict[str, float]`` (the ``WorkerSpec.resources`` shape);
:func:`actor_options` turns it into the keyword arguments of ``.options()``.
"""

from __future__ import annotations

import argparse
import json
import math

from pdserve.errors import ConfigError

#: Ray actor options a role may set (besides custom resources).
OPTION_KEYS = ("num_cpus", "num_gpus", "memory")
ACCELERATOR_PREFIX = "accelerator_type:"
#: Keys that look like a misspelled option rather than a custom resource.
_MISSPELLED = {"cpu": "num_cpus", "cpus": "num_cpus", "gpu": "num_gpus", "gpus": "num_gpus",
               "num_cpu": "num_cpus", "num_gpu": "num_gpus", "mem": "memory",
               "accelerator": "accelerator_type", "accelerator_types": "accelerator_type"}
_ALIASES = {"CPU": "num_cpus", "GPU": "num_gpus"}
#: Components whose placement ``--ROLE-resources`` sets.
ROLES = ("prefill", "decode", "mixed", "router")


def parse_resources(text: str | None, flag: str) -> dict[str, float]:
    """Parse one role's resource JSON (``flag`` names the option in errors); ``None``/empty: ``{}``.

    Raises:
        ConfigError: not a JSON object, a value that is not a number ≥ 0
            (a string for ``accelerator_type``), or a key that looks like a
            misspelled option (``gpus``, ``num_gpu``...).
    """
    if text is None or not text.strip():
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag}: not valid JSON ({exc.msg} at column {exc.colno}): {text!r}; "
                          f"""write e.g. '{{"prefill_node": 1}}' or '{{"num_gpus": 1}}'""") from exc
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{flag}: expected a JSON object of Ray resources, got {type(raw).__name__}: {text!r}"
        )
    out: dict[str, float] = {}
    for key, value in raw.items():
        name = _ALIASES.get(str(key), str(key))
        if name.lower() in _MISSPELLED or (name.startswith("num_") and name not in OPTION_KEYS):
            hint = _MISSPELLED.get(name.lower(), "one of " + ", ".join(OPTION_KEYS))
            raise ConfigError(f"{flag}: unknown key {key!r}; did you mean {hint!r}? (known options: "
                              f"{', '.join(OPTION_KEYS)}, accelerator_type; any other key is a custom "
                              "resource of the cluster's nodes)")
        if name == "accelerator_type":
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{flag}: accelerator_type must be a name such as \"H100\", got {value!r}")
            out[ACCELERATOR_PREFIX + value] = 0.001  # what Ray's own accelerator_type option asks for
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{flag}: {key!r} must be a number, got {value!r}")
        if value < 0 or (value == 0 and name not in OPTION_KEYS):
            bound = "≥ 0" if name in OPTION_KEYS else "> 0"
            raise ConfigError(f"{flag}: {key!r} must be {bound}, got {value}")
        if not name or name.strip() != name:
            raise ConfigError(f"{flag}: {key!r} is not a resource name")
        out[name] = float(value)
    return out


def actor_options(resources: dict[str, float]) -> dict[str, object]:
    """Keyword arguments of ``ActorClass.options()`` for a role's resources.

    An actor that asks for no CPU holds none (``num_cpus=0``): the process it
    hosts uses the node's cores, as a local worker would.
    """
    options: dict[str, object] = {"num_cpus": resources.get("num_cpus", 0.0)}
    if "num_gpus" in resources:
        options["num_gpus"] = resources["num_gpus"]
    if "memory" in resources:
        options["memory"] = resources["memory"]
    custom = {k: v for k, v in resources.items() if k not in OPTION_KEYS}
    if custom:
        options["resources"] = custom
    return options


def check_feasible(role: str, resources: dict[str, float], nodes: list[dict[str, float]]) -> None:
    """Raise ConfigError unless some node of the cluster could ever host one actor of ``role``.

    ``nodes`` are the nodes' total resources (``ray.nodes()[i]["Resources"]``).
    An infeasible actor would wait for ever; this says why at start instead.
    """
    want = {"CPU" if k == "num_cpus" else "GPU" if k == "num_gpus" else k: v for k, v in resources.items()}
    want = {k: v for k, v in want.items() if v > 0}
    if not want or any(all(node.get(k, 0.0) >= v for k, v in want.items()) for node in nodes):
        return
    names = sorted({k for node in nodes for k in node if not k.startswith("node:")})
    missing = sorted(k for k in want if not any(k in node for node in nodes))
    why = (f"no node has {', '.join(repr(m) for m in missing)}" if missing
           else "no single node has all of it")
    raise ConfigError(f"--{role}-resources {json.dumps(resources)}: {why} (the cluster's resources: "
                      f"{', '.join(names)}); start nodes with e.g. ray start --resources "
                      f"""'{{"{role}_node": 1}}'""")


def add_ray_args(parser: argparse.ArgumentParser) -> None:
    """``pdserve serve``'s options of the Ray launcher."""
    parser.add_argument(
        "--ray-address", default=None,
        help="--launcher ray: the cluster (auto, HOST:PORT; default: RAY_ADDRESS or a new local Ray)",
    )
    for role in ROLES:
        parser.add_argument(
            f"--{role}-resources", default=None, metavar="JSON",
            help=f"--launcher ray: Ray resources of each {role} "
                 + ("""actor, e.g. '{"prefill_node": 1}' or '{"num_gpus": 1}'""" if role == "prefill" else
                    "(default: on the node of pdserve serve)" if role == "router" else "actor"),
        )


def role_resources(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Each role's parsed ``--ROLE-resources`` (only the roles given)."""
    out = {}
    for role in ROLES:
        text = getattr(args, f"{role}_resources", None)
        if text is not None:
            out[role] = parse_resources(text, f"--{role}-resources")
    return out


def check_not_ray(args: argparse.Namespace) -> None:
    """Raise ConfigError when a Ray-only option is given to another launcher."""
    given = [f"--{r}-resources" for r in ROLES if getattr(args, f"{r}_resources", None) is not None]
    if getattr(args, "ray_address", None) is not None:
        given.append("--ray-address")
    if given:
        raise ConfigError(f"{', '.join(given)} only apply to --launcher ray (the launcher is "
                          f"{args.launcher!r})")
