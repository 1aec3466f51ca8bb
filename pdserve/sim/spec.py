"""What the simulator takes and gives: pools, the deployment, requests and the result."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.bench.metrics import RequestRecord
from pdserve.config import Role, SchedulerConfig
from pdserve.router.dispatch_config import DispatcherConfig
from pdserve.sim.colocation import CoLocation
from pdserve.sim.link import LinkModel
from pdserve.sim.routing import Route
from pdserve.sim.step_model import StepModel
from pdserve.sim.worker import StepRecord


@dataclass(frozen=True)
class PoolSpec:
    """One pool of identical workers.

    Attributes:
        role: mixed, prefill or decode.
        count: workers in the pool.
        step_model: step durations of one worker.
        num_blocks: KV blocks of one worker.
        link: the outgoing KV link of one worker (prefill pools; a mixed pool with one takes part
            in hand-offs on both sides, as real mixed workers do, and without one only serves whole
            requests).
        num_gpus: accelerators per worker (TP degree), for costs.
        price_per_hour: cost of one worker per hour.
        label: what the pool runs on (hardware and TP, or this machine).
        scheduler: this pool's scheduler settings (None: the deployment's).
        co_location: how much slower a step of one of its workers is while another worker of its
            host is in a step (measured by ``pdserve profile``; None: never slower, one accelerator
            per worker).
        host: the host its workers run on; workers of every pool with the same host share it (a
            deployment on this machine: all of them).
    """

    role: Role
    count: int
    step_model: StepModel
    num_blocks: int
    link: LinkModel | None = None
    num_gpus: int = 1
    price_per_hour: float = 0.0
    label: str = ""
    scheduler: SchedulerConfig | None = None
    co_location: CoLocation | None = None
    host: str = "local"

    def __post_init__(self) -> None:
        if self.count < 1 or self.num_blocks < 1:
            raise ValueError(f"a {self.role} pool needs ≥ 1 worker and ≥ 1 block (got {self.count}, "
                             f"{self.num_blocks})")
        if self.role is Role.PREFILL and self.link is None:
            raise ValueError("a prefill pool needs a KV link model")


@dataclass(frozen=True)
class SimConfig:
    """A deployment to simulate: pools of mixed, prefill and decode workers (one pool per role).

    ``policy`` and ``disagg_policy`` are the router's ``--policy`` and
    ``--disagg-policy``, ``balance_factor`` its ``--balance-factor`` (None: no
    bound); ``seed`` seeds the router's tie-breaking.
    """

    pools: tuple[PoolSpec, ...]
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    block_size: int = 16
    enable_prefix_caching: bool = True
    max_model_len: int = 4096
    num_layers: int = 1
    kv_bytes_per_token: int = 0
    policy: str = "kv_aware"
    disagg_policy: str = "auto"
    balance_factor: float | None = 1.25
    hop_s: float = 0.0002
    request_overhead_s: float = 0.001
    handoff_overhead_s: float = 0.0  # a hand-off's extra cost before its first token (pdserve.sim.serving)
    heartbeat_interval_s: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        roles = [p.role for p in self.pools]
        if len(set(roles)) != len(roles):
            raise ValueError(f"one pool per role, got {sorted(r.value for r in roles)}")
        if Role.MIXED not in roles and Role.DECODE not in roles:
            raise ValueError("a deployment needs a mixed or a decode pool")
        takers = [p for p in self.pools if p.role is Role.DECODE or (p.role is Role.MIXED and p.link)]
        if Role.PREFILL in roles and not takers:
            raise ValueError("a prefill pool needs a decode pool (or a mixed pool with a KV link) to hand "
                             "its KV to")
        DispatcherConfig(policy=self.policy, disagg_policy=self.disagg_policy)  # unknown names: an error

    @property
    def routing(self) -> DispatcherConfig:
        """The router's settings for this deployment."""
        return DispatcherConfig(policy=self.policy, disagg_policy=self.disagg_policy,
                                kv_block_size=self.block_size, balance_factor=self.balance_factor)

    @property
    def disaggregated(self) -> bool:
        """True when the deployment has a prefill pool."""
        return any(p.role is Role.PREFILL for p in self.pools)

    def pool(self, role: Role) -> PoolSpec:
        """The pool of ``role``."""
        return next(p for p in self.pools if p.role is role)


@dataclass(frozen=True)
class SimRequest:
    """One request: when it arrives (s), its prompt's token ids and the tokens asked for."""

    arrival_s: float
    prompt_token_ids: tuple[int, ...]
    max_tokens: int


@dataclass
class SimResult:
    """Per-request records (the bench's), the steps if asked for, and the simulator's own cost.

    ``routes``: each request's placement (workers, reason, KV bytes moved), in
    request order; ``decisions``: placements by reason.
    """

    records: list[RequestRecord]
    steps: list[StepRecord] | None
    num_steps: int
    num_preemptions: int
    busy_s_by_worker: dict[str, float]
    end_s: float
    wall_s: float
    routes: list[Route] = field(default_factory=list)
    decisions: dict[str, int] = field(default_factory=dict)
    kv_bytes: int = 0
