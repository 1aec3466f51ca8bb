"""Small hand-written SVG charts for the bench's HTML report (no plotting library, no network).

:func:`chart` draws one chart: lines (optionally as steps), scatter points,
stacked areas or stacked bars, with axes, grid, horizontal reference lines
(SLOs) and a legend. Every value is data coordinates; ``None`` breaks a line.
"""

from __future__ import annotations

import html
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

PALETTE = ("#2f6fde", "#0f9d76", "#d9468f", "#f0a020", "#7c4dcc", "#3b4654", "#12a38a", "#d64545")


@dataclass
class Series:
    """One series: ``ys[i]`` at ``xs[i]`` (None: no value there)."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float | None]
    color: str = ""


@dataclass
class Chart:
    """What to draw: the series, their kind, axis titles, reference lines."""

    title: str
    series: list[Series]
    x_label: str = ""
    y_label: str = ""
    kind: str = "line"  # line, step, scatter, area (stacked), bars (stacked)
    hlines: list[tuple[float, str]] = field(default_factory=list)
    y_max: float | None = None
    log_x: bool = False


def nice_max(value: float) -> float:
    """The smallest 1/1.5/2/2.5/3/4/5/6/8 × 10^k at or above ``value``."""
    if not value > 0:
        return 1.0
    p = 10 ** math.floor(math.log10(value))
    for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if m * p >= value * (1 - 1e-9):
            return m * p
    return 10 * p


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}".rstrip("0").rstrip(".")
    return f"{v:.3g}"


def chart(c: Chart, width: int = 560, height: int = 250) -> str:
    """The chart as an ``<svg>`` element."""
    m_l, m_r, m_t, m_b = 56, 12, 30, 38
    w, h = width - m_l - m_r, height - m_t - m_b
    for i, s in enumerate(c.series):
        s.color = s.color or PALETTE[i % len(PALETTE)]
    xs = [x for s in c.series for x in s.xs]
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if c.log_x:
        x0, x1 = math.log10(max(x0, 1e-9)), math.log10(max(x1, 1e-9))
    if x1 <= x0:
        x1 = x0 + 1.0
    stacked = c.kind in ("area", "bars")
    if stacked:
        totals: dict[float, float] = {}
        for s in c.series:
            for x, y in zip(s.xs, s.ys, strict=True):
                totals[x] = totals.get(x, 0.0) + (y or 0.0)
        top = max(totals.values(), default=0.0)
    else:
        top = max((y for s in c.series for y in s.ys if y is not None), default=0.0)
    top = max([top, *(v for v, _ in c.hlines)])
    y_max = c.y_max if c.y_max is not None else nice_max(top * 1.05)

    def X(x: float) -> float:
        if c.log_x:
            x = math.log10(max(x, 1e-9))
        return m_l + w * (x - x0) / (x1 - x0)

    def Y(y: float) -> float:
        return m_t + h - h * min(y, y_max) / y_max

    out = [f'<text x="{m_l}" y="16" class="ct">{html.escape(c.title)}</text>']
    for k in range(5):
        v = y_max * k / 4
        out.append(
            f'<line x1="{m_l}" x2="{m_l + w}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" class="grid"/>'
            f'<text x="{m_l - 5}" y="{Y(v) + 4:.1f}" text-anchor="end">{_fmt(v)}</text>'
        )
    for k in range(6):
        xv = x0 + (x1 - x0) * k / 5
        label = _fmt(10**xv if c.log_x else xv)
        px = m_l + w * k / 5
        out.append(
            f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{m_t + h}" y2="{m_t + h + 4}" class="axis"/>'
            f'<text x="{px:.1f}" y="{m_t + h + 16}" text-anchor="middle">{label}</text>'
        )
    out.append(f'<line x1="{m_l}" x2="{m_l + w}" y1="{m_t + h}" y2="{m_t + h}" class="axis"/>')
    out.append(
        f'<text x="{m_l + w / 2}" y="{height - 4}" text-anchor="middle">{html.escape(c.x_label)}</text>'
    )
    out.append(
        f'<text x="12" y="{m_t + h / 2}" text-anchor="middle" transform="rotate(-90 12 {m_t + h / 2})">'
        f"{html.escape(c.y_label)}</text>"
    )
    out.extend(_marks(c, X, Y))
    for value, label in c.hlines:
        out.append(
            f'<line x1="{m_l}" x2="{m_l + w}" y1="{Y(value):.1f}" y2="{Y(value):.1f}" class="ref"/>'
            f'<text x="{m_l + w - 2}" y="{Y(value) - 4:.1f}" text-anchor="end" class="reft">'
            f"{html.escape(label)}</text>"
        )
    legend, lx = [], m_l + 8
    for s in c.series:
        legend.append(
            f'<rect x="{lx}" y="{m_t - 4}" width="10" height="10" fill="{s.color}"/>'
            f'<text x="{lx + 14}" y="{m_t + 5}">{html.escape(s.label)}</text>'
        )
        lx += 24 + 7 * len(s.label)
    out.extend(legend)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img">{"".join(out)}</svg>'
    )


def _marks(c: Chart, X: object, Y: object) -> list[str]:
    assert callable(X) and callable(Y)
    out: list[str] = []
    if c.kind in ("area", "bars"):
        base: dict[float, float] = {}
        xs_all = sorted({x for s in c.series for x in s.xs})
        step = min((b - a for a, b in itertools.pairwise(xs_all)), default=1.0)
        for s in c.series:
            points = [(x, y or 0.0) for x, y in zip(s.xs, s.ys, strict=True)]
            if c.kind == "bars":
                bw = max(X(xs_all[0] + step) - X(xs_all[0]) - 1, 1) if xs_all else 2
                for x, y in points:
                    if y > 0:
                        bottom = base.get(x, 0.0)
                        out.append(
                            f'<rect x="{X(x) - bw / 2:.1f}" y="{Y(bottom + y):.1f}" width="{bw:.1f}" '
                            f'height="{Y(bottom) - Y(bottom + y):.1f}" fill="{s.color}"/>'
                        )
                        base[x] = bottom + y
                continue
            upper = [f"{X(x):.1f},{Y(base.get(x, 0.0) + y):.1f}" for x, y in points]
            lower = [f"{X(x):.1f},{Y(base.get(x, 0.0)):.1f}" for x, _ in reversed(points)]
            out.append(f'<polygon points="{" ".join(upper + lower)}" fill="{s.color}" fill-opacity=".8"/>')
            for x, y in points:
                base[x] = base.get(x, 0.0) + y
        return out
    for s in c.series:
        if c.kind == "scatter":
            out.extend(
                f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="1.6" fill="{s.color}" fill-opacity=".5"/>'
                for x, y in zip(s.xs, s.ys, strict=True)
                if y is not None
            )
            continue
        segment: list[str] = []
        previous_y: float | None = None
        ended: list[tuple[float, float | None]] = [*zip(s.xs, s.ys, strict=True), (math.nan, None)]
        for xv, yv in ended:
            if yv is None:
                if len(segment) > 1:
                    out.append(
                        f'<polyline points="{" ".join(segment)}" fill="none" stroke="{s.color}" '
                        'stroke-width="1.8"/>'
                    )
                segment, previous_y = [], None
                continue
            if c.kind == "step" and previous_y is not None:
                segment.append(f"{X(xv):.1f},{Y(previous_y):.1f}")
            segment.append(f"{X(xv):.1f},{Y(yv):.1f}")
            previous_y = yv
    return out
