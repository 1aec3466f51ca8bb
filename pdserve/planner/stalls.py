"""Stalls: a mixed worker's streams waiting past the gap SLO while a prompt chunk computes.

A mixed worker runs a prompt in chunks of ``C`` tokens inside the decode steps
of the streams beside it; one chunk step of a long prompt can outlast the gap
SLO ``G`` by itself, late chunks most (attention grows with the position).

**Chunk step time** (:class:`ChunkFit`). The window's timed prefills (prompt
length ``L``, the worker's prefill time ``t``) are fitted by least squares to

    t(L) = s · ⌈L / C⌉ + a · L + k · L²

(``s``: what every chunk step costs before its tokens, on a mixed worker with
the decode rows batched into it on average; ``a``: per prompt token; ``k``:
attention, ``L²/2`` query-key pairs). A chunk covering positions
``[p, q)`` then takes ``s + a·(q − p) + k·(q² − p²)``. Before this fit the
planner priced a chunk at ``C`` tokens over the prompt's measured rate, which
holds the per-step cost of every chunk spread over its tokens: on S7's surge
load (simulated, 2M held) that put a 256-token chunk at ~200 ms, a hair past
the 203 ms gap SLO, so every chat prompt over one chunk counted as stalling,
and the predicted stall share was about twice the one measured. The fit
needs :data:`MIN_POINTS` prefills and returns None when a coefficient comes
out negative (too little spread in the lengths to tell them apart); the
planner then keeps the last fit, or falls back to the rate.

**Stall share** (:func:`stall_share`). A prompt is *stalling* when a chunk
step (chunks counted from the prompt's end, the last one full: where the
boundaries fall depends on the decode tokens sharing each step's budget)
passes ``G``; ``T`` is the time of its chunk steps that do. A stream on a
worker receiving stalling prompts at ``λs`` per second, that decodes for
``D`` seconds, meets one with probability ``1 − exp(−λs (D + T))``; that
share of its requests misses. ``T`` is not the whole prefill: a stream that
ends while a prompt's early, shorter chunks run is not stalled (counting the
whole prefill also predicted about twice the measured stalls).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

#: Timed prefills a chunk fit needs.
MIN_POINTS = 6


@dataclass(frozen=True)
class ChunkFit:
    """``t(L) = step_s · ⌈L/C⌉ + token_s · L + pair_s · L²`` (seconds; see the module docstring)."""

    step_s: float
    token_s: float
    pair_s: float

    def chunk_s(self, start: int, end: int) -> float:
        """One chunk step computing prompt positions ``[start, end)``."""
        return self.step_s + self.token_s * (end - start) + self.pair_s * (end * end - start * start)

    def blend(self, old: ChunkFit, weight: float) -> ChunkFit:
        """This fit counting ``weight`` against ``old`` (a window's fit is a few dozen prompts)."""

        def mix(new: float, prev: float) -> float:
            return weight * new + (1 - weight) * prev

        return ChunkFit(mix(self.step_s, old.step_s), mix(self.token_s, old.token_s),
                        mix(self.pair_s, old.pair_s))


def fit_chunks(points: Sequence[tuple[int, float]], chunk_tokens: int) -> ChunkFit | None:
    """Least squares over ``(prompt tokens, prefill seconds)``; None when it cannot be told apart."""
    if len(points) < MIN_POINTS or chunk_tokens <= 0:
        return None
    # columns scaled to comparable sizes (L² reaches 10⁷) before the normal equations
    rows = [(float(math.ceil(n / chunk_tokens)), n / 1e3, (n / 1e3) ** 2) for n, _ in points]
    ys = [t for _, t in points]
    ata = [[sum(r[i] * r[j] for r in rows) for j in range(3)] for i in range(3)]
    aty = [sum(r[i] * y for r, y in zip(rows, ys, strict=True)) for i in range(3)]
    solved = _solve3(ata, aty)
    if solved is None or any(c < 0 for c in solved):
        return None
    s, a, k = solved
    return ChunkFit(step_s=s, token_s=a / 1e3, pair_s=k / 1e6)


def _solve3(m: list[list[float]], v: list[float]) -> tuple[float, float, float] | None:
    """``m x = v`` for a 3×3 ``m`` by Cramer's rule (None when it is near singular)."""

    def det(a: list[list[float]]) -> float:
        return (a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
                - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
                + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]))

    d = det(m)
    scale = max(abs(x) for row in m for x in row) ** 3
    if scale <= 0 or abs(d) < 1e-12 * scale:
        return None
    out = []
    for col in range(3):
        mc = [[v[i] if j == col else m[i][j] for j in range(3)] for i in range(3)]
        out.append(det(mc) / d)
    return out[0], out[1], out[2]


def stall_share(
    lam: float,
    lengths: Sequence[int],
    prefill_tps: float,
    per_pair_s: float,
    gap_s: float,
    chunk_tokens: int,
    decode_part_s: float,
    decode_s: float,
    fit: ChunkFit | None = None,
) -> float:
    """Share of a mixed worker's streams stalled past ``gap_s`` by a prompt chunk (module docstring):
    ``lam`` requests/s reach the worker, ``lengths`` sample their prompts and a stream decodes for
    ``decode_s`` seconds. A chunk step takes ``fit.chunk_s``; without a fit, its tokens over
    ``prefill_tps`` less the mean attention share, plus ``per_pair_s`` attention, plus the decode
    tokens batched with it (``decode_part_s``)."""
    if lam <= 0 or not lengths:
        return 0.0
    rate = max(prefill_tps, 1e-9)
    per_token = max(1.0 / rate - per_pair_s * sum(lengths) / len(lengths), 0.25 / rate)

    def chunk_s(start: int, end: int) -> float:
        if fit is not None:
            return fit.chunk_s(start, end)
        return per_token * (end - start) + per_pair_s * (end * end - start * start) + decode_part_s

    stalling = []  # per stalling prompt: the time its chunk steps past the gap take
    for n in lengths:
        end, past = n, 0.0
        while end > 0:
            start = max(end - chunk_tokens, 0)
            step = chunk_s(start, end)
            if step <= gap_s:
                break  # earlier chunks attend to fewer keys: none of them passes the gap either
            past += step
            end = start
        if past > 0:
            stalling.append(past)
    if not stalling:
        return 0.0
    lam_s = lam * len(stalling) / len(lengths)
    exposure = decode_s + sum(stalling) / len(stalling)
    if not math.isfinite(exposure):
        return 1.0
    return 1.0 - math.exp(-lam_s * exposure)
