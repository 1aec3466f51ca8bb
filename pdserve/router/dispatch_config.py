"""Settings and counters of the router's dispatcher (routing, leases, deadlines, recovery)."""

from __future__ import annotations

from dataclasses import dataclass, field

KV_FAILURE_POLICIES = ("retry", "recompute", "fail")
ROUTING_POLICIES = ("kv_aware", "least_loaded", "round_robin")
DISAGG_POLICIES = ("auto", "always", "never")


@dataclass(frozen=True)
class DispatcherConfig:
    """Router-side dispatch and recovery settings.

    Attributes:
        bind: control endpoint workers connect to, ``tcp://HOST:PORT``.
        policy: routing policy name (``kv_aware``, ``round_robin``, ``least_loaded``).
        disagg_policy: where prompts are computed: ``auto`` (the cost model decides,
            per request, between a prefill worker and the decode worker itself),
            ``always`` (a prefill worker whenever one is up) or ``never`` (the
            decode worker).
        kv_block_size: block size the cache index hashes prompts with; workers with
            another one are refused (None: the first worker registered sets it).
        balance_factor: the cost model's bounded-loads factor: a worker whose in-flight requests
            would exceed this × its pool's mean (+ 1) does not take the request, whatever it
            has cached (None: no bound; see docs/routing.md).
        speculative_ttl_s: how long the router assumes a worker holds a prompt it
            just sent there, before the worker's events confirm it.
        lease_s: a worker whose heartbeats stop for this long is removed. Its
            heartbeats come between engine steps, which can take seconds on a
            loaded CPU, so this is long; a dead process or host is noticed much
            sooner through its connection (probes, and ZeroMQ's own transport
            heartbeats every second, answered by its I/O thread even mid-step).
        probe_interval_s: how often workers are probed and deadlines checked.
        kv_timeout_s: deadline from the first token to the decode worker holding the KV.
        prefill_timeout_s: deadline from dispatch to the first token.
        token_timeout_s: deadline between two tokens while decoding (a stuck worker).
        kv_failure_policy: what a missed KV deadline does: ``retry`` (new attempt),
            ``recompute`` (the decode worker prefills itself) or ``fail``.
        prefill_fallback: with no prefill worker left, decode workers prefill.
        max_attempts: attempts per request before it fails.
        secret: workers must present it to register ("" accepts any).
    """

    bind: str = "tcp://127.0.0.1:0"
    policy: str = "kv_aware"
    disagg_policy: str = "auto"
    kv_block_size: int | None = None
    balance_factor: float | None = 1.25
    speculative_ttl_s: float = 5.0
    lease_s: float = 30.0
    probe_interval_s: float = 0.25
    kv_timeout_s: float = 10.0
    prefill_timeout_s: float = 120.0
    token_timeout_s: float = 60.0
    kv_failure_policy: str = "retry"
    prefill_fallback: bool = True
    max_attempts: int = 4
    secret: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.policy not in ROUTING_POLICIES:
            raise ValueError(f"policy={self.policy!r}: use one of {', '.join(ROUTING_POLICIES)}")
        if self.disagg_policy not in DISAGG_POLICIES:
            raise ValueError(f"disagg_policy={self.disagg_policy!r}: use one of {', '.join(DISAGG_POLICIES)}")
        if self.balance_factor is not None and self.balance_factor < 1:
            raise ValueError(f"balance_factor={self.balance_factor} must be >= 1 (None: no bound)")
        if self.kv_failure_policy not in KV_FAILURE_POLICIES:
            raise ValueError(
                f"kv_failure_policy={self.kv_failure_policy!r}: use one of {', '.join(KV_FAILURE_POLICIES)}"
            )


@dataclass
class DispatchCounters:
    """What recovery did, for metrics and tests."""

    num_retries: int = 0
    num_migrations: int = 0
    num_fallback_prefills: int = 0
    num_kv_timeouts: int = 0
    num_failed: int = 0
    num_workers_lost: int = 0
    kv_bytes: int = 0
