"""S7's loads and SLO rule, shared by the measured run (``s7_planner.py``) and the simulated one
(``s7_simulate.py``).

Loads (``--load``): a run is three phases of ``--phase-s`` seconds; each phase is one or more
independent Poisson streams of one workload kind (their superposition is Poisson too).

* ``classic`` (S7's first load): ``chat`` at ``--chat-rate`` → ``summarization`` at
  ``--summary-rate`` → ``chat``. One SLO for everything: TTFT ≤ ``ttft_ms``, TPOT ≤ ``tpot_ms``.
* ``surge``: ``chat`` at ``--chat-rate`` → the same chat at ``--surge-chat-rate`` *plus* long
  documents (``summarization`` prompts) at ``--summary-rate`` → ``chat`` again. The interactive
  users stay through the document surge: their streams decode while the documents' prompts are
  prefilled. The service's one SLO (the same for every phase and request) has three terms:

  - TTFT ≤ ``ttft_ms`` + ``ttft_per_token_ms`` × (prompt tokens): length-aware, as services that
    accept long documents state it (a user who pastes 2,000 tokens expects to wait longer than one
    who types a line; a flat TTFT would make every document a miss on every shape of this budget —
    S7's first run: TTFT p90 2.5–3.1 s at 0.25 req/s everywhere);
  - TPOT (a request's mean gap) ≤ ``tpot_ms``;
  - the longest gap between two tokens of a request ≤ ``gap_ms`` (a stall: streamed text or speech
    visibly stops). This is the term S2 measured disaggregation winning (background ITL p99 3.5×
    lower under long prompts): on a mixed worker a stream waits for every prompt chunk scheduled
    beside it.

  Goodput counts a request good only when it meets all three; the per-request TTFT threshold is
  recorded with the SLO in the result, so the figure can be recomputed from the records.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from pdserve.bench.metrics import SLO, RequestRecord

LOADS = ("classic", "surge")
#: ``surge``'s defaults (see s7_simulate.py's table and docs/planner.md for why these).
SURGE_DEFAULTS = {"chat_rate": 1.0, "surge_chat_rate": 0.5, "summary_rate": 0.3}
CLASSIC_DEFAULTS = {"chat_rate": 1.0, "surge_chat_rate": 0.0, "summary_rate": 0.25}


@dataclass(frozen=True)
class ServiceSLO:
    """One SLO for the whole service; a request is good when it meets every term given."""

    ttft_ms: float
    tpot_ms: float
    ttft_per_token_ms: float = 0.0
    gap_ms: float | None = None

    def ttft_limit_ms(self, prompt_tokens: int) -> float:
        """The TTFT threshold of a request with this many prompt tokens."""
        return self.ttft_ms + self.ttft_per_token_ms * max(prompt_tokens, 0)

    def met(self, r: RequestRecord) -> bool:
        """``r`` succeeded within every term."""
        if not r.ok or r.ttft_s is None:
            return False
        if r.ttft_s * 1e3 > self.ttft_limit_ms(r.num_prompt_tokens):
            return False
        tpot = r.tpot_s
        if tpot is not None and tpot * 1e3 > self.tpot_ms:
            return False
        return not (self.gap_ms is not None and r.itls_s and max(r.itls_s) * 1e3 > self.gap_ms)

    def flat(self) -> SLO:
        """The bench's SLO of the flat terms (its summary's own attainment; ours is :meth:`met`)."""
        return SLO(ttft_ms=self.ttft_ms, tpot_ms=self.tpot_ms, itl_ms=self.gap_ms)

    def as_dict(self) -> dict[str, float | None]:
        """JSON-ready."""
        return asdict(self)

    @classmethod
    def parse(cls, spec: str) -> ServiceSLO:
        """``ttft_ms=..,tpot_ms=..[,ttft_per_token_ms=..][,gap_ms=..]``."""
        values: dict[str, float] = {}
        for part in spec.split(","):
            key, _, value = part.partition("=")
            values[key.strip()] = float(value)
        unknown = set(values) - {"ttft_ms", "tpot_ms", "ttft_per_token_ms", "gap_ms"}
        if unknown or "ttft_ms" not in values or "tpot_ms" not in values:
            raise ValueError(f"SLO {spec!r}: give ttft_ms and tpot_ms [, ttft_per_token_ms, gap_ms]")
        return cls(**values)


def slo_rule(
    ttft_chat_s: float,
    tpot_s: float,
    ttft_long_s: float | None,
    long_tokens: int,
    chat_tokens: int,
    load: str,
) -> ServiceSLO:
    """The SLO from single requests measured one at a time on agg.

    ``classic``: S3's derivation (TTFT × 10, TPOT × 3). ``surge`` adds the per-token TTFT
    allowance — 3 × the measured prefill time per prompt token (the slope between a chat prompt and
    a long one) — and the stall term: 15 × the single-stream TPOT (≈ 250 ms on this machine: longer
    than a 256-token prompt chunk on a one-thread mixed worker takes late in a long prompt, several
    times a decode step at the batches S7 reaches).
    """
    base = SLO(ttft_ms=round(10 * ttft_chat_s * 1e3, 1), tpot_ms=round(3 * tpot_s * 1e3, 2))
    assert base.ttft_ms is not None and base.tpot_ms is not None
    if load == "classic" or ttft_long_s is None:
        return ServiceSLO(base.ttft_ms, base.tpot_ms)
    per_token = max(ttft_long_s - ttft_chat_s, 0.0) / max(long_tokens - chat_tokens, 1)
    return ServiceSLO(base.ttft_ms, base.tpot_ms, round(3 * per_token * 1e3, 4), round(15 * tpot_s * 1e3, 1))


def phases(args: argparse.Namespace) -> list[list[tuple[str, float]]]:
    """The run's phases: each a list of (workload kind, req/s) streams."""
    if args.load == "classic":
        return [
            [("chat", args.chat_rate)],
            [("summarization", args.summary_rate)],
            [("chat", args.chat_rate)],
        ]
    middle = [("chat", args.surge_chat_rate)] if args.surge_chat_rate > 0 else []
    return [
        [("chat", args.chat_rate)],
        [*middle, ("summarization", args.summary_rate)],
        [("chat", args.chat_rate)],
    ]


def phase_names(args: argparse.Namespace) -> list[str]:
    """``chat``, ``summarization`` or ``chat+summarization`` per phase."""
    return ["+".join(kind for kind, _ in p) for p in phases(args)]


def add_load_args(p: argparse.ArgumentParser) -> None:
    """``--load`` and its rates (None: the load's default)."""
    p.add_argument(
        "--load",
        choices=LOADS,
        default="classic",
        help="classic: chat → summarization → chat (S7's first run); surge: chat → chat + long "
        "documents → chat, with the length-aware, stall-bounded SLO (docs/planner.md)",
    )
    p.add_argument("--phase-s", type=float, default=180.0, help="seconds per phase")
    p.add_argument(
        "--chat-rate",
        type=float,
        default=None,
        help=f"req/s of chat in phases 1 and 3 (classic {CLASSIC_DEFAULTS['chat_rate']}, "
        f"surge {SURGE_DEFAULTS['chat_rate']})",
    )
    p.add_argument(
        "--surge-chat-rate",
        type=float,
        default=None,
        help=f"surge: req/s of chat during the documents (default {SURGE_DEFAULTS['surge_chat_rate']})",
    )
    p.add_argument(
        "--summary-rate",
        type=float,
        default=None,
        help=f"req/s of documents (classic {CLASSIC_DEFAULTS['summary_rate']}, "
        f"surge {SURGE_DEFAULTS['summary_rate']})",
    )


def resolve_load_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the rates left unset with the load's defaults (in place; returned)."""
    defaults = SURGE_DEFAULTS if args.load == "surge" else CLASSIC_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.load == "classic" and args.surge_chat_rate:
        raise SystemExit("--surge-chat-rate is for --load surge")
    return args


#: The 2-core budget's static shapes and the planner's start, as `pdserve serve`/`simulate` options.
SHAPES: dict[str, list[str]] = {
    "agg": ["--mode", "aggregated", "--mixed", "1", "--threads-per-worker", "2"],
    "agg2": ["--mode", "aggregated", "--mixed", "2", "--threads-per-worker", "1"],
    "disagg": ["--mode", "disaggregated", "--prefill", "1", "--decode", "1", "--threads-per-worker", "1"],
    "planner": [
        "--mode",
        "aggregated",
        "--mixed",
        "2",
        "--planner",
        "slo",
        "--max-cores",
        "2",
    ],
}
