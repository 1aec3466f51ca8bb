"""S8's step check: a served worker's own steps (``PDSERVE_STEP_LOG``) against the profile's step model.

A cell of S8 compares served and simulated TTFT/TPOT; when they differ, this
says where: if the served steps took what the profile's model says (ratio ~1),
the time went between steps or in queueing; if not, the steps themselves ran
at another speed than the profile measured (the model's form, or the process).

    PDSERVE_STEP_LOG=/tmp/steps pdserve serve ...   # then
    python benchmarks/s8_steps.py /tmp/steps benchmarks/results/s8_profile_1thread.json [--by-partner]

Per worker log and step kind (``decode``: no prompt tokens; ``prefill``: some),
the median of served seconds / the profile's fitted model (without serving
overhead or co-location), the medians of both, and the median wait between
two steps less than 50 ms apart (the worker loop's own time between busy
steps). ``--by-partner``: each worker's steps split by what the other
workers were doing meanwhile (alone, beside a decode step, beside a prompt
step), each group's median served / model and its ratio to the same kind's
alone steps — co-location as the served deployment had it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.sim.colocation import BUSY_OVERLAP, IDLE_OVERLAP, MIN_SERVED_STEPS, overlap_share, step_kind
from pdserve.sim.profile import Profile, load_profile
from pdserve.sim.step_model import StepModel, StepShape
from pdserve.worker.step_log import BUSY_GAP_S, LoggedStep, read_step_log


def summarize(log_dir: Path, model: StepModel) -> dict[str, Any]:
    """``{worker id: {kind: figures}}`` over every ``*.jsonl`` step log in ``log_dir``."""
    out: dict[str, Any] = {}
    for path in sorted(log_dir.glob("*.jsonl")):
        steps = read_step_log(path)
        kinds: dict[str, list[tuple[float, float]]] = {}
        for step in steps:
            kinds.setdefault(step_kind(step.shape), []).append((step.s, model.step_time_s(step.shape)))
        gaps = [gap for prev, step in itertools.pairwise(steps)
                if 0 <= (gap := step.t - (prev.t + prev.s)) < BUSY_GAP_S]
        out[path.stem] = {
            kind: {
                "num_steps": len(pairs),
                "served_ms_p50": round(statistics.median(s for s, _ in pairs) * 1e3, 2),
                "model_ms_p50": round(statistics.median(m for _, m in pairs) * 1e3, 2),
                "served_over_model_p50": round(statistics.median(s / m for s, m in pairs if m > 0), 3),
            }
            for kind, pairs in sorted(kinds.items())
        }
        out[path.stem]["busy_gap_ms_p50"] = round(statistics.median(gaps) * 1e3, 3) if gaps else None
    return out


def _others(logs: dict[Path, list[LoggedStep]], path: Path, kind: str | None = None
            ) -> tuple[list[LoggedStep], list[float]]:
    """Every other worker's steps (of ``kind``; None: all), sorted by start, and their starts: what
    :func:`~pdserve.sim.colocation.overlap_share` takes."""
    steps = sorted((s for p, other in logs.items() if p != path for s in other
                    if kind is None or step_kind(s.shape) == kind), key=lambda s: s.t)
    return steps, [s.t for s in steps]


def window_speed(log_dir: Path, model: StepModel, t0: float, t1: float, alone: bool = False
                 ) -> dict[str, float]:
    """Per step kind (``decode``, ``prefill``), the median of served / ``model`` over every worker's steps
    that started in [t0, t1) (``time.perf_counter`` of this host, as the logs and the bench's runs
    keep it); a kind with no step there is left out.

    ``alone``: only steps during which no other worker of the deployment was stepping (under
    :data:`~pdserve.sim.colocation.IDLE_OVERLAP` of the step's time), the speed the simulator's step
    model stands for before it applies co-location; a kind with fewer than
    :data:`~pdserve.sim.colocation.MIN_SERVED_STEPS` such steps takes all of its steps instead."""
    logs = {path: read_step_log(path) for path in sorted(log_dir.glob("*.jsonl"))}
    ratios: dict[str, list[float]] = {}
    lone: dict[str, list[float]] = {}
    for path, steps in logs.items():
        others, starts = _others(logs, path)
        for step in steps:
            predicted = model.step_time_s(step.shape)
            if not (t0 <= step.t < t1 and predicted > 0):
                continue
            kind = step_kind(step.shape)
            ratios.setdefault(kind, []).append(step.s / predicted)
            if alone and overlap_share(others, step.t, step.t + step.s, starts) < IDLE_OVERLAP:
                lone.setdefault(kind, []).append(step.s / predicted)
    return {kind: statistics.median(v if len(lone.get(kind, [])) < MIN_SERVED_STEPS else lone[kind])
            for kind, v in sorted(ratios.items())}


def by_partner(log_dir: Path, model: StepModel) -> dict[str, Any]:
    """``{worker id: {"<kind> <condition>": figures}}``: each worker's steps split by what the other
    workers were doing meanwhile — ``alone`` (their steps cover under 5 % of this one), ``beside
    decode`` / ``beside prefill`` (steps of that kind cover over half of it), else ``mixed`` — with the
    step count, the median served / model, and that median over the same kind's ``alone`` one (the
    co-location slowdown as served; None without alone steps)."""
    logs = {path: read_step_log(path) for path in sorted(log_dir.glob("*.jsonl"))}
    out: dict[str, Any] = {}
    for path, steps in logs.items():
        others = {kind: _others(logs, path, kind) for kind in ("decode", "prefill")}
        groups: dict[str, list[float]] = {}
        for step in steps:
            predicted = model.step_time_s(step.shape)
            if predicted <= 0 or step.s <= 0:
                continue
            cover = {kind: overlap_share(other, step.t, step.t + step.s, starts)
                     for kind, (other, starts) in others.items()}
            if sum(cover.values()) < IDLE_OVERLAP:
                condition = "alone"
            elif max(cover.values()) > BUSY_OVERLAP:
                condition = "beside " + max(cover, key=lambda k: cover[k])
            else:
                condition = "mixed"
            groups.setdefault(f"{step_kind(step.shape)} {condition}", []).append(step.s / predicted)
        row: dict[str, Any] = {}
        for key, ratios in sorted(groups.items()):
            alone = groups.get(key.split()[0] + " alone")
            median = statistics.median(ratios)
            row[key] = {"num_steps": len(ratios), "served_over_model_p50": round(median, 3),
                        "over_alone": round(median / statistics.median(alone), 3) if alone else None}
        out[path.stem] = row
    return out


@dataclass(frozen=True)
class KindScaled:
    """A step model whose prompt steps and decode-only steps are scaled by measured factors (the
    served steps' speed in a cell, :func:`window_speed`): what the simulator would predict had it
    known the machine's speed during that cell. A diagnostic, not a prediction."""

    inner: StepModel
    speed: dict[str, float]

    def step_time_s(self, shape: StepShape) -> float:
        return self.inner.step_time_s(shape) * self.speed.get(step_kind(shape), 1.0)


def speed_table(cells: list[dict[str, Any]], metrics: tuple[str, ...]) -> list[str]:
    """Markdown lines: each S8 cell's served step speed and its errors had the simulator known it
    (nothing for result files from before the diagnostic). Cells that also kept the speed of the steps
    run with no other worker stepping (``served_speed_alone``) show it: the errors were computed with it,
    since the simulator adds co-location on top."""
    known = [c for c in cells if c.get("at_served_speed")]
    if not known:
        return []
    with_alone = any("served_speed_alone" in c for c in known)
    lines = ["A diagnostic, not the prediction: each cell's served steps ran at this speed against the "
             "profile's model (median served / model, every worker's steps in the cell's time"
             + ("; then of the steps during which no other worker stepped" if with_alone else "")
             + "), and the errors had the simulator known it (its step models scaled by "
             + ("the second, to which it adds co-location" if with_alone else "it") + "):", "",
             "| config | rate | served / model: decode, prefill | "
             + ("alone: decode, prefill | " if with_alone else "")
             + " | ".join(f"{m.split('_ms_')[0].upper()} {m.split('_ms_')[1]}" for m in metrics) + " |",
             "|---|---|---|" + ("---|" if with_alone else "") + "---|" * len(metrics)]

    def pair(sp: dict[str, float]) -> str:
        return f"{sp.get('decode', float('nan')):.2f}, {sp.get('prefill', float('nan')):.2f}"

    for c in known:
        lines.append(f"| {c['config']} | {c['rate_per_s']:g} | {pair(c['served_speed'])} | "
                     + (f"{pair(c.get('served_speed_alone') or {})} | " if with_alone else "")
                     + " | ".join(f"{c['at_served_speed'][m]:+.0%}" for m in metrics) + " |")
    return [*lines, ""]


def line(summary: dict[str, Any]) -> str:
    """One printable line per worker."""
    parts = []
    for worker, kinds in summary.items():
        figures = [f"{k} {v['served_over_model_p50']:.2f}× ({v['served_ms_p50']:.1f} vs "
                   f"{v['model_ms_p50']:.1f} ms, {v['num_steps']} steps)"
                   for k, v in kinds.items() if isinstance(v, dict)]
        parts.append(f"{worker}: served/model {', '.join(figures)}; between busy steps "
                     f"{kinds['busy_gap_ms_p50']} ms")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("log_dir", type=Path)
    p.add_argument("profile", type=Path)
    p.add_argument("--model", default="bench-50m")
    p.add_argument("--by-partner", action="store_true",
                   help="split each worker's steps by what the other workers were doing meanwhile")
    args = p.parse_args(argv)
    profile: Profile = load_profile(args.profile, args.model)
    if args.by_partner:
        for worker, groups in by_partner(args.log_dir, profile.step_model).items():
            print(worker)
            for key, g in groups.items():
                rel = "" if g["over_alone"] is None else f", ×{g['over_alone']:.3f} of alone"
                print(f"  {key:22} {g['num_steps']:6} steps: served / model "
                      f"{g['served_over_model_p50']:.3f}{rel}")
        return
    summary = summarize(args.log_dir, profile.step_model)
    print(line(summary))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
