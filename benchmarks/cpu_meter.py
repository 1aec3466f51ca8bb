"""CPU time of a local deployment's processes, this client and the whole machine over a window.

The machine is shared: another job that holds a core during a measurement
slows the deployment down as surely as load does. :class:`CpuMeter` reads
``/proc`` at the start and the end of a window and reports, in cores' worth
(1.0 = one core busy all the time), what each process of the deployment and
this process used, what the whole machine used, and the difference: the
other processes, which a benchmark reports beside its figures.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any, Protocol


class Deployment(Protocol):
    """What is metered: named processes (a ``LocalLauncher``, a ``ServeLauncher``)."""

    @property
    def procs(self) -> Sequence[tuple[str, Any]]: ...


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process (all its threads) has used so far; NaN once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return math.nan


def machine_busy_seconds() -> float:
    """CPU seconds all cores of the machine spent busy (not idle or iowait) since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU time of each deployment process, this client and the whole machine over a window."""

    def __init__(self, launcher: Deployment) -> None:
        self.pids = {name: proc.pid for name, proc in launcher.procs}
        self.pids["client"] = os.getpid()
        self._start: dict[str, float] = {}
        self._t0 = 0.0

    def _sample(self) -> dict[str, float]:
        sample = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        sample["machine"] = machine_busy_seconds()
        return sample

    def start(self) -> None:
        self._start, self._t0 = self._sample(), time.perf_counter()

    def stop(self) -> dict[str, float]:
        """Cores' worth used per process over the window, the machine's, and ``other_processes``."""
        end, wall_s = self._sample(), time.perf_counter() - self._t0
        used = {name: (end[name] - self._start[name]) / wall_s for name in end}
        used["other_processes"] = used["machine"] - sum(v for k, v in used.items() if k != "machine")
        return {k: round(v, 3) for k, v in used.items()}
