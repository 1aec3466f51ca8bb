"""When requests are sent: seeded arrival processes for an open-loop load.

An open-loop generator sends each request at its arrival time whether or not
earlier ones have finished (the server's slowness cannot slow the load down,
as it would with a fixed pool of clients). Gaps between arrivals are:

- ``poisson``: exponential with mean 1/rate (independent arrivals);
- ``constant``: exactly 1/rate;
- ``gamma``: gamma with shape ``burstiness`` and mean 1/rate — burstiness 1 is
  Poisson, below 1 burstier, above 1 more regular (vLLM's convention).

A rate of ``inf`` sends everything at once (bounded by ``--max-concurrency``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from pdserve.errors import ConfigError

ARRIVAL_KINDS = ("poisson", "constant", "gamma")


@dataclass(frozen=True)
class ArrivalConfig:
    """An arrival process.

    Attributes:
        rate: mean requests per second (``math.inf``: no gaps).
        kind: one of ``ARRIVAL_KINDS``.
        burstiness: shape of the gamma distribution (``gamma`` only).
        seed: seeds the gaps.
    """

    rate: float
    kind: str = "poisson"
    burstiness: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ARRIVAL_KINDS:
            raise ConfigError(f"arrival process {self.kind!r}: use one of {', '.join(ARRIVAL_KINDS)}")
        if not self.rate > 0:
            raise ConfigError(f"request rate must be > 0 (or inf), got {self.rate}")
        if not self.burstiness > 0:
            raise ConfigError(f"burstiness must be > 0, got {self.burstiness}")

    def gaps_s(self) -> Iterator[float]:
        """Endless seconds between consecutive arrivals (the first request goes at once)."""
        if math.isinf(self.rate):
            while True:
                yield 0.0
        rng = random.Random(self.seed)
        mean_s = 1.0 / self.rate
        while True:
            if self.kind == "constant":
                yield mean_s
            elif self.kind == "poisson":
                yield rng.expovariate(self.rate)
            else:
                yield rng.gammavariate(self.burstiness, mean_s / self.burstiness)

    def offsets_s(self) -> Iterator[float]:
        """Endless arrival times in seconds from the start: 0, then the running sum of the gaps."""
        t = 0.0
        for gap in self.gaps_s():
            yield t
            t += gap
