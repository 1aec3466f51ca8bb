"""``pdserve plan``'s search: the cheapest deployment shape that meets the SLOs, by simulation.

A *shape* is one pool of mixed workers (aggregated) or a prefill pool and a
decode pool (disaggregated), each pool ``count`` workers of ``tp``
accelerators of one kind. Every shape is judged by simulating the same
seeded requests (:func:`evaluate`): it *meets* the SLO when the share of
requests meeting every threshold is ≥ the target (0.9).

Search (:func:`search`):

1. candidate pool kinds: every (accelerator, TP) of the lists given whose
   memory holds the model with room for KV;
2. aggregated: per kind, the fewest workers that meet the SLO (doubling,
   then bisection: more workers never hurt);
3. disaggregated: per (prefill kind, decode kind), from the fewest prefill
   workers that meet the TTFT part with a generous decode pool upward: for
   each prefill count, the fewest decode workers meeting every SLO (doubling,
   then bisection), until a prefill count costs more with one decode worker
   than the best pair found. (Sizing P first and D after it is not enough:
   a full decode pool delays first tokens too, as no prompt is computed
   before its KV has a home, and more P can need fewer D.) Kinds whose cheapest
   possible shape already costs more than the best found are skipped;
4. the answer: the cheapest shape meeting the SLO (cost per hour, then per
   million output tokens at the requested rate), the runners-up, and, when
   nothing meets it, the closest shape (highest attainment).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from pdserve.bench.metrics import SLO
from pdserve.config import Role, SchedulerConfig
from pdserve.errors import ConfigError
from pdserve.modelspec.arch import ArchConfig
from pdserve.sim.deploy import PlannedRequest, paper_pool
from pdserve.sim.hardware import Accelerator
from pdserve.sim.results import simulate_run
from pdserve.sim.roofline import KV_DTYPE_BYTES, RooflineStepModel, kv_link
from pdserve.sim.simulator import SimConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kind:
    """A worker kind: ``tp`` accelerators of one type."""

    accel: Accelerator
    tp: int

    @property
    def label(self) -> str:
        """``h100×2``."""
        return f"{self.accel.key}×{self.tp}"

    @property
    def price_per_hour(self) -> float:
        """USD per worker-hour."""
        return self.accel.price_per_hour * self.tp


@dataclass(frozen=True)
class Shape:
    """A deployment: ``mixed`` workers, or ``prefill`` + ``decode`` workers."""

    mixed: tuple[Kind, int] | None = None
    prefill: tuple[Kind, int] | None = None
    decode: tuple[Kind, int] | None = None

    @property
    def disaggregated(self) -> bool:
        """True for prefill + decode."""
        return self.mixed is None

    @property
    def price_per_hour(self) -> float:
        """USD per hour of every accelerator of the shape."""
        return sum(k.price_per_hour * n for k, n in self.pools())

    @property
    def num_accels(self) -> int:
        """Accelerators in the shape."""
        return sum(k.tp * n for k, n in self.pools())

    def pools(self) -> list[tuple[Kind, int]]:
        """(kind, count) of each pool."""
        return [p for p in (self.mixed, self.prefill, self.decode) if p is not None]

    def describe(self) -> str:
        """``agg 3 × h100×1`` or ``disagg 1 × h100×1 P + 2 × a100×1 D``."""
        if self.mixed is not None:
            return f"agg {self.mixed[1]} × {self.mixed[0].label}"
        assert self.prefill is not None and self.decode is not None
        p, d = self.prefill, self.decode
        return f"disagg {p[1]} × {p[0].label} P + {d[1]} × {d[0].label} D"


@dataclass(frozen=True)
class Verdict:
    """How a shape did: attainment of each SLO part and of all, latencies, costs."""

    shape: Shape
    attainment: float
    attainment_ttft: float
    attainment_rest: float
    ttft_p90_ms: float
    tpot_p90_ms: float
    cost_per_hour: float
    cost_per_m_output_tokens: float
    decisions: dict[str, int] = field(default_factory=dict)  # the router's placements by reason

    def meets(self, target: float) -> bool:
        """Every SLO at ≥ ``target`` attainment."""
        return self.attainment >= target


@dataclass
class Planner:
    """Evaluates shapes on one seeded request set; remembers every verdict."""

    arch: ArchConfig
    requests: Sequence[PlannedRequest]
    rate: float
    slo: SLO
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    block_size: int = 16
    precision: str = "bf16"
    target: float = 0.9
    max_workers: int = 16
    generous_decode: int | None = None  # decode workers while sizing P (None: max_workers // 2)
    verdicts: dict[Shape, Verdict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.slo.given:
            raise ConfigError("give an SLO to plan for, e.g. --slo ttft_ms=500,tpot_ms=50")
        if not 0 < self.target <= 1:
            raise ConfigError(f"the attainment target must be in (0, 1], got {self.target}")
        measured = [p for p in self.requests if not p.warmup and p.error is None]
        if not measured:
            raise ConfigError("no request to plan with (every prompt is longer than the model's context?)")
        self.mean_output_tokens = sum(p.request.max_tokens for p in measured) / len(measured)

    def step_model(self, kind: Kind) -> RooflineStepModel:
        """The roofline of a worker kind."""
        return RooflineStepModel(self.arch, kind.accel, kind.tp, self.precision)

    def config(self, shape: Shape) -> SimConfig:
        """The simulator's deployment for a shape."""
        pools = []
        if shape.disaggregated:
            assert shape.prefill is not None and shape.decode is not None
            link = kv_link(self.step_model(shape.prefill[0]), self.step_model(shape.decode[0]))
        else:  # mixed workers hand KV off to each other when the router finds it cheaper
            assert shape.mixed is not None
            link = kv_link(self.step_model(shape.mixed[0]), self.step_model(shape.mixed[0]))
        roles = ((Role.MIXED, shape.mixed), (Role.PREFILL, shape.prefill), (Role.DECODE, shape.decode))
        for role, pool in roles:
            if pool is not None:
                kind, count = pool
                spec = paper_pool(role, count, self.step_model(kind), self.block_size,
                                  link if role is not Role.DECODE else None)
                if role is Role.PREFILL:
                    # no decodes to protect on a prefill worker: whole prompts up to the step budget
                    spec = replace(spec, scheduler=replace(
                        self.scheduler, chunk_size=self.scheduler.max_num_batched_tokens))
                pools.append(spec)
        return SimConfig(pools=tuple(pools), scheduler=self.scheduler, block_size=self.block_size,
                         max_model_len=self.arch.max_position_embeddings, num_layers=self.arch.num_layers,
                         kv_bytes_per_token=self.arch.kv_bytes_per_token(KV_DTYPE_BYTES))

    def evaluate(self, shape: Shape) -> Verdict:
        """Simulate a shape (once; later calls reuse the verdict)."""
        if shape in self.verdicts:
            return self.verdicts[shape]
        run, sim = simulate_run(self.config(shape), self.requests, self.rate, self.slo)
        s = run.summary
        measured = [r for r in run.records if not r.warmup]
        ttft_only = SLO(ttft_ms=self.slo.ttft_ms)
        rest = replace(self.slo, ttft_ms=None)
        share = (lambda slo: sum(slo.met(r) for r in measured) / len(measured))  # noqa: E731
        cost = shape.price_per_hour
        tokens_per_hour = self.rate * self.mean_output_tokens * 3600
        verdict = Verdict(
            shape=shape, attainment=s.attainment,
            attainment_ttft=share(ttft_only) if self.slo.ttft_ms else 1.0,
            attainment_rest=share(rest) if rest.given else 1.0,
            ttft_p90_ms=s.ttft_ms["p90"], tpot_p90_ms=s.tpot_ms["p90"],
            cost_per_hour=cost, cost_per_m_output_tokens=cost / tokens_per_hour * 1e6,
            decisions=sim.decisions,
        )
        self.verdicts[shape] = verdict
        logger.info("%s: attainment %.3f, $%.2f/h", shape.describe(), verdict.attainment, cost)
        return verdict

    # -- search ------------------------------------------------------------------------------

    def fewest(self, ok: Callable[[int], bool]) -> int | None:
        """The smallest n in 1..max_workers with ok(n) (ok assumed monotone); None if none."""
        hi = 1
        while not ok(hi):
            if hi >= self.max_workers:
                return None
            hi = min(hi * 2, self.max_workers)
        lo = hi // 2 + 1 if hi > 1 else 1
        while lo < hi:
            mid = (lo + hi) // 2
            if ok(mid):
                hi = mid
            else:
                lo = mid + 1
        return hi

    def best_aggregated(self, kind: Kind) -> Verdict | None:
        """The fewest mixed workers of ``kind`` meeting the SLO."""
        n = self.fewest(lambda n: self.evaluate(Shape(mixed=(kind, n))).meets(self.target))
        return None if n is None else self.evaluate(Shape(mixed=(kind, n)))

    def best_disaggregated(self, p_kind: Kind, d_kind: Kind) -> Verdict | None:
        """The cheapest (prefill, decode) counts meeting the SLO (see the module docstring)."""
        generous = self.generous_decode or max(2, self.max_workers // 2)
        p_min = self.fewest(lambda n: self.evaluate(Shape(prefill=(p_kind, n), decode=(d_kind, generous)))
                            .attainment_ttft >= self.target)
        if p_min is None:
            return None
        best: Verdict | None = None
        for p in range(p_min, self.max_workers + 1):
            floor = p * p_kind.price_per_hour + d_kind.price_per_hour  # p prefill workers and one decode
            if best is not None and floor >= best.cost_per_hour:
                break
            d = self.fewest(lambda n, p=p: self.evaluate(  # type: ignore[misc]
                Shape(prefill=(p_kind, p), decode=(d_kind, n))).meets(self.target))
            if d is None:
                most = self.evaluate(Shape(prefill=(p_kind, p), decode=(d_kind, self.max_workers)))
                if most.attainment_rest < self.target:
                    break  # the decode part misses with every decode worker: more P will not help
                continue
            v = self.evaluate(Shape(prefill=(p_kind, p), decode=(d_kind, d)))
            if best is None or v.cost_per_hour < best.cost_per_hour:
                best = v
        return best


def candidate_kinds(arch: ArchConfig, accels: Sequence[Accelerator], tps: Sequence[int], block_size: int,
                    precision: str, per_part: int = 2) -> list[Kind]:
    """(accelerator, TP) pairs holding the model with room for KV: the ``per_part`` smallest TPs of each."""
    kinds: list[Kind] = []
    for accel in accels:
        fitting = []
        for tp in sorted(set(tps)):
            try:
                RooflineStepModel(arch, accel, tp, precision).num_kv_blocks(block_size)
            except ConfigError:
                continue
            fitting.append(Kind(accel, tp))
        kinds.extend(fitting[:per_part])
    return kinds


@dataclass
class PlanResult:
    """The search's answer."""

    best: Verdict | None
    runners_up: list[Verdict]
    closest: Verdict | None
    best_aggregated: Verdict | None
    best_disaggregated: Verdict | None
    num_evaluated: int


MODES = ("aggregated", "disaggregated")


def search(planner: Planner, mixed_kinds: Sequence[Kind], prefill_kinds: Sequence[Kind],
           decode_kinds: Sequence[Kind], modes: Sequence[str] = MODES) -> PlanResult:
    """Search the shapes (see the module docstring)."""
    if not (mixed_kinds or (prefill_kinds and decode_kinds)):
        raise ConfigError("no accelerator × TP holds the model: add hardware or larger --tp values")
    found: list[Verdict] = []

    def best_cost(disaggregated: bool) -> float:
        # pruned within each mode, so that the best of both modes is known (docs/cost.md compares them)
        return min((v.cost_per_hour for v in found if v.shape.disaggregated == disaggregated),
                   default=float("inf"))

    if "aggregated" in modes:
        for kind in sorted(mixed_kinds, key=lambda k: k.price_per_hour):
            if kind.price_per_hour >= best_cost(False):
                continue
            v = planner.best_aggregated(kind)
            if v is not None:
                found.append(v)
    if "disaggregated" in modes:
        pairs = [(p, d) for p in prefill_kinds for d in decode_kinds]
        for p_kind, d_kind in sorted(pairs, key=lambda pd: pd[0].price_per_hour + pd[1].price_per_hour):
            if p_kind.price_per_hour + d_kind.price_per_hour >= best_cost(True):
                continue
            v = planner.best_disaggregated(p_kind, d_kind)
            if v is not None:
                found.append(v)
    found.sort(key=lambda v: (v.cost_per_hour, -v.attainment))
    every = list(planner.verdicts.values())
    closest = None if found else max(every, key=lambda v: (v.attainment, -v.cost_per_hour), default=None)
    return PlanResult(
        best=found[0] if found else None, runners_up=found[1:6], closest=closest,
        best_aggregated=next((v for v in found if not v.shape.disaggregated), None),
        best_disaggregated=next((v for v in found if v.shape.disaggregated), None),
        num_evaluated=len(every),
    )
