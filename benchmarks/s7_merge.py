"""``s7_planner.py --merge FILE``: re-measure some configurations, take the others from FILE.

FILE is an earlier ``s7_planner.py`` result. Its rows are taken only when it ran the same load
(model, load kind, phase length, rates, seed, disaggregation policy, recovery bin) and the same SLO
(every term); anything else is refused before a configuration is started. As S3's ``--merge``
(merge_runs.py), each configuration's row records the commit it was measured at (``measured_in``),
and a merged row where it came from (``merged_from``); the best static shape and the planner's
ratio to it are recomputed over the merged set (:func:`best_static`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from merge_runs import MergeError, earlier_configs
from s7_load import ServiceSLO

__all__ = ["LOAD_KEYS", "MergeError", "best_static", "earlier"]

#: ``settings`` that define the load: they must match for rows to be comparable.
LOAD_KEYS = ("model", "load", "phase_s", "chat_rate", "surge_chat_rate", "summary_rate", "seed",
             "disagg_policy", "bin_s")


def earlier(path: str, args: argparse.Namespace, slo: ServiceSLO | None) -> tuple[ServiceSLO, dict[str, Any]]:
    """The SLO to run at (FILE's; ``slo`` must equal it when given) and FILE's rows of the
    configurations this run does not measure, each with ``measured_in`` (merge_runs.provenance)
    and ``merged_from``. Raises :class:`MergeError` for another load or SLO, or no result."""
    try:
        old = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise MergeError(f"--merge {path}: cannot read it ({exc})") from exc
    if not isinstance(old.get("configs"), dict) or not old.get("slo"):
        raise MergeError(f"--merge {path}: not an s7_planner.py result (no configs or SLO)")
    theirs = ServiceSLO(**old["slo"])
    if slo is not None and slo != theirs:
        raise MergeError(f"--merge {path}: another SLO ({theirs.as_dict()} there, {slo.as_dict()} here)")
    differ = [f"{k}: {old['settings'].get(k)!r} there, {getattr(args, k, None)!r} here"
              for k in LOAD_KEYS if (old.get("settings") or {}).get(k) != getattr(args, k, None)]
    if differ:
        raise MergeError(f"--merge {path}: another load ({'; '.join(differ)})")
    rows = earlier_configs(Path(path), vars(args), theirs.as_dict(), LOAD_KEYS, set(args.configs.split(",")))
    return theirs, {k: {**row, "merged_from": row.get("merged_from") or str(path)} for k, row in rows.items()}


def best_static(configs: dict[str, Any]) -> tuple[str | None, float | None]:
    """The static configuration of the highest goodput, and the planner's goodput over it."""
    statics = {k: v for k, v in configs.items() if k != "planner"}
    best = max(statics, key=lambda k: statics[k]["goodput_req_s"]) if statics else None
    ratio = (
        round(configs["planner"]["goodput_req_s"] / statics[best]["goodput_req_s"], 3)
        if best and "planner" in configs and statics[best]["goodput_req_s"]
        else None
    )
    return best, ratio
