"""S8's step check: a served worker's own steps (``PDSERVE_STEP_LOG``) against the profile's step model.

A cell of S8 compares served and simulated TTFT/TPOT; when they differ, this
says where: if the served steps took what the profile's model says (ratio ~1),
the time went between steps or in queueing; if not, the steps themselves ran
at another speed than the profile measured (the model's form, or the process).

    PDSERVE_STEP_LOG=/tmp/steps pdserve serve ...   # then
    python benchmarks/s8_steps.py /tmp/steps benchmarks/results/s8_profile_1thread.json

Per worker log and step kind (``decode``: no prompt tokens; ``prefill``: some),
the median of served seconds / the profile's fitted model (without serving
overhead or co-location), the medians of both, and the median wait between
two steps less than 50 ms apart (the worker loop's own time between busy
steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from pdserve.sim.profile import Profile, load_profile
from pdserve.sim.step_model import StepModel, StepShape

#: Steps further apart than this were separated by idleness, not by the worker loop.
BUSY_GAP_S = 0.05


def summarize(log_dir: Path, model: StepModel) -> dict[str, Any]:
    """``{worker id: {kind: figures}}`` over every ``*.jsonl`` step log in ``log_dir``."""
    out: dict[str, Any] = {}
    for path in sorted(log_dir.glob("*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        kinds: dict[str, list[tuple[float, float]]] = {}
        gaps: list[float] = []
        for prev, rec in zip([None, *records], records, strict=False):
            shape = StepShape(**rec["shape"])
            kind = "prefill" if shape.num_prefill_tokens else "decode"
            kinds.setdefault(kind, []).append((rec["s"], model.step_time_s(shape)))
            if prev is not None:
                gap = rec["t"] - (prev["t"] + prev["s"])
                if 0 <= gap < BUSY_GAP_S:
                    gaps.append(gap)
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
    args = p.parse_args(argv)
    profile: Profile = load_profile(args.profile, args.model)
    summary = summarize(args.log_dir, profile.step_model)
    print(line(summary))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
