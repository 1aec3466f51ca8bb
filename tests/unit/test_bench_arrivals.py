"""Arrival processes of ``pdserve bench`` (statistical checks with fixed seeds)."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest

from pdserve.bench.arrivals import ArrivalConfig
from pdserve.errors import ConfigError


def gaps(config: ArrivalConfig, n: int) -> list[float]:
    return list(itertools.islice(config.gaps_s(), n))


def test_poisson_mean_rate_and_exponential_spread() -> None:
    g = gaps(ArrivalConfig(rate=50.0, kind="poisson", seed=1), 20000)
    assert 1 / statistics.fmean(g) == pytest.approx(50.0, rel=0.03)
    cv = statistics.pstdev(g) / statistics.fmean(g)
    assert cv == pytest.approx(1.0, abs=0.05)  # exponential: standard deviation = mean
    # memoryless: P(gap > mean) = 1/e
    assert sum(x > 1 / 50 for x in g) / len(g) == pytest.approx(math.exp(-1), abs=0.02)


def test_constant_spacing_is_exact() -> None:
    offsets = list(itertools.islice(ArrivalConfig(rate=8.0, kind="constant").offsets_s(), 9))
    assert offsets == pytest.approx([i / 8 for i in range(9)])


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_keeps_the_rate_and_sets_the_burstiness(burstiness: float) -> None:
    g = gaps(ArrivalConfig(rate=20.0, kind="gamma", burstiness=burstiness, seed=2), 20000)
    assert 1 / statistics.fmean(g) == pytest.approx(20.0, rel=0.05)
    cv = statistics.pstdev(g) / statistics.fmean(g)
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)  # gamma: CV = 1/sqrt(shape)


def test_seeded_and_infinite_rate() -> None:
    a = gaps(ArrivalConfig(rate=5.0, seed=7), 100)
    assert a == gaps(ArrivalConfig(rate=5.0, seed=7), 100)
    assert a != gaps(ArrivalConfig(rate=5.0, seed=8), 100)
    assert gaps(ArrivalConfig(rate=math.inf), 5) == [0.0] * 5
    assert next(ArrivalConfig(rate=5.0).offsets_s()) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"rate": 0.0}, "rate"), ({"rate": 1.0, "kind": "uniform"}, "poisson, constant, gamma"),
     ({"rate": 1.0, "kind": "gamma", "burstiness": 0.0}, "burstiness")],
)  # fmt: skip
def test_bad_arrival_settings(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ArrivalConfig(**kwargs)  # type: ignore[arg-type]
