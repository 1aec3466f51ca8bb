"""Helpers shared by the benchmark scripts: machine description, ratios, JSON results.

Every result file carries :func:`machine_info` so that a figure can be traced
to the machine, the code (git commit) and how busy the shared host was when
it was measured.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pdserve.launch.local import LaunchConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Setup:
    """One deployment configuration a scenario compares (S2, S3)."""

    key: str
    description: str
    launch: LaunchConfig


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> dict[str, Any]:
    """HEAD's hash, whether tracked files differ from it and a hash of that diff (None outside a checkout)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    if git("rev-parse", "--is-inside-work-tree") != "true":
        # an export (``git archive``) of a commit, measured away from a checkout being edited
        return {"commit": os.environ.get("BENCH_GIT_COMMIT"), "dirty": None, "diff_sha1": None,
                "export": str(REPO_ROOT)}
    # Result files rewritten by the suite itself do not make the measured code dirty.
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
    diff = git("diff", "HEAD", "--", ".", ":!benchmarks/results")  # its hash names the tree measured
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
        "diff_sha1": hashlib.sha1(diff.encode()).hexdigest() if diff else None,
    }


def _command() -> str | None:
    """How this script was started, with its path relative to the repository."""
    if not sys.argv or not sys.argv[0]:
        return None
    script = Path(sys.argv[0]).resolve()
    shown = str(script.relative_to(REPO_ROOT)) if script.is_relative_to(REPO_ROOT) else sys.argv[0]
    return " ".join([shown, *sys.argv[1:]])


def package_version(name: str) -> str | None:
    """Installed version of a distribution, without importing it (importing torch takes seconds)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """What ran the benchmark, and how loaded the (shared) machine was at this moment."""
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": package_version("torch"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git_commit(),
        "command": _command(),
        "load_avg_1_5_15min": list(os.getloadavg()),  # other jobs on this host skew absolute times
    }


def ratio(num: float, den: float) -> float:
    """num / den; NaN when either is missing (NaN) or den is 0."""
    if math.isnan(num) or math.isnan(den) or den == 0:
        return math.nan
    return num / den


def _json_safe(value: Any) -> Any:
    """NaN and infinities become None (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, result: dict[str, Any]) -> Path:
    """Write a result file (creating its folder); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(result), indent=2) + "\n")
    return path
