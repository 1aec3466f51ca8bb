"""One cost model, in seconds: where a request's prompt is computed and who decodes it.

Pure functions over plain data (:class:`WorkerSnapshot`), so the router, the
planner and the simulator call the same code:

* ``prefill_s(w, uncached)`` — predicted time to first token on prefill
  candidate ``w``: its queued prompt tokens plus this prompt's uncached ones,
  over its measured prefill rate (tokens/s).
* ``transfer_s(tokens)`` — KV bytes that must move (the prompt less what the
  decode worker already holds), over the measured link rate, plus a fixed
  hand-off cost (reservation round trip, done notice).
* ``itl_s(w)`` — predicted inter-token latency on decode candidate ``w``: its
  measured decode step time scaled by its batch (running + waiting + this
  one) and by KV pressure (a nearly full cache preempts).
* A remote placement (prefill worker P, decode worker D) costs
  ``prefill_s(P) + transfer_s(D) + outputs · itl_s(D)``; a local one (D, or a
  mixed worker, computes the prompt itself) costs ``prefill_s(D) +
  interference + outputs · itl_s(D)``, where the interference charges the
  stall of D's running streams while it computes the prompt.
* Mixed workers take part on both sides of a hand-off: a mixed worker is a
  prefill candidate (M→D) charged, besides ``prefill_s``, the interference
  of the prompt with its own running streams, and a decode candidate (P→M)
  charged like a decode worker. P = D is never a pair (that is the local
  option), nor mixed → mixed (see :func:`plan`).
* Bounded loads (:func:`over_bound`): a candidate whose in-flight requests
  would exceed ``balance_factor`` × its pool's mean (plus ``balance_slack``)
  is left out of the search for this request, so cache affinity cannot pile
  a popular prefix's users onto the worker that holds it: the request goes
  to the best candidate within the bound, which computes the prefix and
  becomes a second home for it.
* :func:`plan` searches the candidates, keeps the lowest cost, and breaks
  near-ties (within ``tie_rel``/``tie_abs_s``) first by load (fewest
  requests in flight on the computing worker), then by the fewest blocks
  held in its cache (a prefix nobody holds goes to the emptiest cache, so
  homes spread instead of landing where chance put them), then by the power
  of two random choices among what is still tied.

Units: seconds, tokens, bytes, tokens/s, bytes/s.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

DISAGG_POLICIES = ("auto", "always", "never")

# Why a placement was chosen (metrics label and trace attribute).
REMOTE = "remote_cheaper"  # auto: prefill on a prefill worker was predicted faster
LOCAL_SHORT = "local_short"  # auto: the prompt is short: moving it costs more than computing it
LOCAL_CACHED = "local_cached"  # auto: the decode worker already holds most of the prompt
LOCAL_BUSY = "local_prefill_busy"  # auto: the prefill pool's queue made remote slower
FORCED_REMOTE = "forced_remote"  # --disagg-policy always
FORCED_LOCAL = "forced_local"  # --disagg-policy never
NO_PREFILL = "no_prefill_worker"  # no prefill worker: the decode worker prefills (fallback)
AGGREGATED = "aggregated"  # a mixed worker computes and decodes
REASONS = (REMOTE, LOCAL_SHORT, LOCAL_CACHED, LOCAL_BUSY, FORCED_REMOTE, FORCED_LOCAL, NO_PREFILL, AGGREGATED)


@dataclass(frozen=True)
class WorkerSnapshot:
    """What the cost model needs to know of one worker.

    Attributes:
        worker_id: its id.
        role: ``prefill``, ``decode`` or ``mixed``.
        queued_prefill_tokens: prompt tokens dispatched to it and not yet computed.
        prefill_rate_tps: measured prompt tokens per second (None: not measured yet).
        num_running: requests in its running batch.
        num_waiting: requests queued (for blocks, a step, or KV).
        kv_usage: fraction of its KV blocks in use (0..1).
        decode_step_s: measured seconds per decode step (None: not measured yet).
        decode_batch: mean sequences per measured decode step (what ``decode_step_s`` was measured at).
        link_bytes_per_s: measured KV link rate into it (decode side; None: not measured).
        kv_handoff: a mixed worker that can be either side of a KV hand-off (it has a KV sender and
            receiver); False keeps it to local placements. Prefill and decode workers ignore it.
        num_inflight: requests the router dispatched to it and has not seen end (its load for the
            bounded-loads rule: the router's own count, current at once, unlike heartbeats).
        held_blocks: blocks its prefix cache holds as the router's index sees them (confirmed and
            speculative): among near-tied candidates the emptiest cache takes a new prefix.
        prefill_step_s, prefill_token_s: its prefill time as a cost per step plus one per prompt
            token (``pdserve.router.step_fit``; None: not fitted, ``prefill_rate_tps`` prices it).
        decode_base_s, decode_seq_s: its decode step time as a cost per step plus one per sequence
            in the batch (its pool's fit; None: not fitted, ``decode_step_s`` / ``decode_batch``
            price it).
    """

    worker_id: str
    role: str
    queued_prefill_tokens: int = 0
    prefill_rate_tps: float | None = None
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    decode_step_s: float | None = None
    decode_batch: float = 1.0
    link_bytes_per_s: float | None = None
    kv_handoff: bool = True
    num_inflight: int = 0
    held_blocks: int = 0
    prefill_step_s: float = 0.0
    prefill_token_s: float | None = None
    decode_base_s: float = 0.0
    decode_seq_s: float | None = None

    @property
    def sends_kv(self) -> bool:
        """Can compute a prompt and push its KV to another worker."""
        return self.role == "prefill" or (self.role == "mixed" and self.kv_handoff)

    @property
    def receives_kv(self) -> bool:
        """Can decode a request whose KV another worker computed."""
        return self.role == "decode" or (self.role == "mixed" and self.kv_handoff)


@dataclass(frozen=True)
class CostParams:
    """Defaults used until measured, and the knobs of the model.

    Attributes:
        prefill_rate_tps: prefill rate of a worker not measured yet.
        decode_step_s: decode step time (batch of one) of a worker not measured yet.
        link_bytes_per_s: KV link rate not measured yet.
        kv_bytes_per_token: KV bytes of one token (all layers, K and V).
        handoff_s: fixed cost of a remote prefill (reservation round trip, done notice, messages).
        interference_weight: share of a local prefill's compute time charged per running stream on D:
            1, every stream in D's batch waits that long for its next tokens (a step that also
            computes a prompt chunk is longer by the chunk's time). S3 measured 0.25 wrong: on a
            decode-bound 1P+1D deployment it sent 60 % of the chat prompts to D's own prefill while
            P idled, and cut goodput below that of ``always``.
        num_outputs_cap: output tokens counted in the decode term (max_tokens, capped).
        pressure_knee: KV usage above which the decode term grows steeply (preemptions).
        tie_rel, tie_abs_s: costs within ``max(tie_abs_s, tie_rel · best)`` of the best are ties.
            15 %: the measured prefill rates of equal workers differ by about 10 % (which batches
            each happened to run); with 5 % the worker measured fastest took every new prefix
            (the simulated S6 cache-pressure load put 7 of 12 documents' first prompts on one of
            three prefill workers, and evictions cut its cache hits).
        balance_factor: the bounded-loads factor c: a candidate whose in-flight requests, this one
            included, would exceed c × its pool's mean (this request counted) + ``balance_slack``
            is not a candidate for this request (see :func:`over_bound`). None: no bound.
        balance_slack: requests a worker may take beyond c × the mean, so a lightly loaded pool
            keeps its cache affinity. 2: a prefix's home with one or two requests in flight while
            its peers idle keeps the next one. With 1 every overlap spilled (bound 1.83 for one
            in flight in a pool of 3), and under cache pressure the spilled prefixes evicted each
            other: S6's 12 × 1,024-token documents on 3 workers of 6,144 tokens measured 35 % of
            the ideal cache hits; the simulator (the router's own Placer) gave 30–46k cached
            tokens with 1 and 47–72k with 2, with no change on S6's default load.
    """

    prefill_rate_tps: float = 2000.0
    decode_step_s: float = 0.02
    link_bytes_per_s: float = 1e9
    kv_bytes_per_token: int = 0
    handoff_s: float = 0.01
    interference_weight: float = 1.0
    num_outputs_cap: int = 64
    pressure_knee: float = 0.85
    tie_rel: float = 0.15
    tie_abs_s: float = 0.002
    balance_factor: float | None = 1.25
    balance_slack: float = 2.0

    def __post_init__(self) -> None:
        if self.prefill_rate_tps <= 0 or self.decode_step_s <= 0 or self.link_bytes_per_s <= 0:
            raise ValueError("prefill_rate_tps, decode_step_s and link_bytes_per_s must be > 0")
        if self.balance_factor is not None and self.balance_factor < 1:
            raise ValueError(f"balance_factor={self.balance_factor} must be >= 1 (None: no bound)")
        if self.balance_slack < 0:
            raise ValueError(f"balance_slack={self.balance_slack} must be >= 0")
        if not 0 < self.pressure_knee < 1:
            raise ValueError(f"pressure_knee={self.pressure_knee} must be in (0, 1)")


@dataclass(frozen=True)
class Placement:
    """A decision: ``prefill_id`` None means the decode worker (or mixed worker) computes the prompt."""

    prefill_id: str | None
    decode_id: str
    reason: str
    cost_s: float
    ttft_s: float  # the predicted time to first token part of the cost
    num_cached_tokens: int  # prompt tokens the computing worker holds (predicted from the index)
    num_moved_tokens: int  # tokens whose KV moves P → D (0 when local)
    balanced: bool = False  # the bound left out a candidate that held more of the prompt cached


# -- the terms ------------------------------------------------------------------------------------


def prefill_s(w: WorkerSnapshot, num_uncached_tokens: int, params: CostParams) -> float:
    """Predicted seconds until ``w`` has computed this prompt (its queue first).

    With a per-step + per-token fit: one step's fixed cost plus every queued
    and uncached token's; otherwise the tokens over the measured rate.
    """
    if w.prefill_token_s is not None:
        return w.prefill_step_s + (w.queued_prefill_tokens + num_uncached_tokens) * w.prefill_token_s
    rate = w.prefill_rate_tps or params.prefill_rate_tps
    return (w.queued_prefill_tokens + num_uncached_tokens) / rate


def transfer_s(num_tokens: int, link_bytes_per_s: float | None, params: CostParams) -> float:
    """Predicted seconds to move ``num_tokens`` tokens of KV, plus the hand-off's fixed cost."""
    rate = link_bytes_per_s or params.link_bytes_per_s
    return params.handoff_s + num_tokens * params.kv_bytes_per_token / rate


def itl_s(w: WorkerSnapshot, params: CostParams) -> float:
    """Predicted inter-token latency on ``w`` once this request joins its batch.

    With a per-step + per-sequence fit: the step at that batch; otherwise the
    measured step scaled by the batch (never below the measured step).
    """
    batch = w.num_running + w.num_waiting + 1
    pressure = 1.0 + max(0.0, w.kv_usage - params.pressure_knee) / (1.0 - params.pressure_knee) * 4.0
    if w.decode_seq_s is not None:
        return (w.decode_base_s + w.decode_seq_s * batch) * pressure
    step = w.decode_step_s if w.decode_step_s is not None else params.decode_step_s
    per_seq = step / max(w.decode_batch, 1.0)
    return max(step, per_seq * batch) * pressure


def interference_s(w: WorkerSnapshot, num_uncached_tokens: int, params: CostParams) -> float:
    """What computing a prompt on a decode worker costs its running streams."""
    rate = w.prefill_rate_tps or params.prefill_rate_tps
    return num_uncached_tokens / rate * w.num_running * params.interference_weight


# -- the search -----------------------------------------------------------------------------------


def over_bound(pool: Sequence[WorkerSnapshot], params: CostParams) -> frozenset[str]:
    """Workers of ``pool`` that may not take this request under the bounded-loads rule.

    A worker is over the bound when its in-flight requests, this one added,
    would exceed ``balance_factor`` × the pool's mean in-flight requests (this
    one counted) + ``balance_slack``. With a slack of at least 1 − 1/n the
    least loaded worker of a pool of n is always within it; if none is, no
    one is left out. A pool of one, and ``balance_factor`` None, are never bounded.
    """
    c = params.balance_factor
    if c is None or len(pool) < 2:
        return frozenset()
    bound = c * (sum(w.num_inflight for w in pool) + 1) / len(pool) + params.balance_slack
    over = frozenset(w.worker_id for w in pool if w.num_inflight + 1 > bound)
    return over if len(over) < len(pool) else frozenset()



def pick_lowest(
    costs: Sequence[tuple[float, int]],
    params: CostParams,
    rng: random.Random,
    scale_s: float,
    keys: Sequence[tuple[int, ...]] | None = None,
) -> int:
    """Index (the second field) of the lowest cost; near-ties go by ``keys``, then two random choices.

    Costs within ``max(tie_abs_s, tie_rel · scale_s)`` of the lowest are ties:
    ``scale_s`` is the part of the cost that tells candidates apart (the best
    TTFT), so a large term shared by all (the decode term) does not blur it.
    ``keys[i]`` (optional, indexed like the second fields): among ties only the
    smallest key stays; the power of two random choices picks among those left.
    """
    best = min(c for c, _ in costs)
    ties = [(c, i) for c, i in costs if c <= best + max(params.tie_abs_s, params.tie_rel * scale_s)]
    if keys is not None and len(ties) > 1:
        low = min(keys[i] for _, i in ties)
        ties = [(c, i) for c, i in ties if keys[i] == low]
    if len(ties) == 1:
        return ties[0][1]
    a, b = rng.sample(ties, 2)
    return (a if a[0] <= b[0] else b)[1]


def plan(
    num_tokens: int,
    num_outputs: int,
    cached_blocks: Mapping[str, int],
    block_size: int,
    prefill: Sequence[WorkerSnapshot],
    local: Sequence[WorkerSnapshot],
    params: CostParams,
    rng: random.Random,
    disagg_policy: str = "auto",
) -> Placement | None:
    """The cheapest placement of a prompt of ``num_tokens`` tokens.

    ``prefill``: workers that can compute the prompt for another (prefill
    workers and mixed ones). ``local``: workers that can decode (decode and
    mixed workers), which may also compute the prompt themselves.
    ``cached_blocks``: leading blocks of the prompt each worker holds (from the
    cache index). None when there is no candidate at all.

    Candidates over their pool's load bound (:func:`over_bound`, the prefill
    side over ``prefill``, the local side over ``local``) are left out; the
    decode side of a hand-off is not bounded (its cost already grows with its
    batch).
    """
    if disagg_policy not in DISAGG_POLICIES:
        raise ValueError(f"disagg_policy={disagg_policy!r}: use one of {', '.join(DISAGG_POLICIES)}")
    outputs = min(num_outputs, params.num_outputs_cap)
    max_cached = max(num_tokens - 1, 0) // block_size * block_size

    def cached(w: WorkerSnapshot) -> int:
        return min(cached_blocks.get(w.worker_id, 0) * block_size, max_cached)

    options: list[tuple[float, Placement]] = []
    keys: list[tuple[int, ...]] = []  # near-ties: (computing worker's load, its cache, decoder's load)
    senders = [w for w in prefill if w.sends_kv]
    decoders = [w for w in local if w.receives_kv]
    over = over_bound(senders, params)
    within = [w for w in senders if w.worker_id not in over]
    over_local = over_bound(local, params)
    held = 0  # the most of the prompt a candidate left out by the bound holds
    if within and decoders and disagg_policy != "never":
        held = max((cached(w) for w in senders if w.worker_id in over), default=0)
        reason = REMOTE if disagg_policy == "auto" else FORCED_REMOTE
        # A mixed worker hands prompts to, or takes them from, dedicated prefill and decode
        # workers only: mixed workers passing KV to each other could fill each other's caches
        # with reservations that wait on each other's prefills (a cycle no block frees), and
        # a pool of mixed workers alone is what users run as an aggregated deployment.
        itl = {d.worker_id: itl_s(d, params) for d in decoders}
        for p in within:
            uncached_p = num_tokens - cached(p)
            ttft_p = prefill_s(p, uncached_p, params)
            # A mixed worker's own streams stall while it computes the prompt for another.
            stall_p = interference_s(p, uncached_p, params) if p.role == "mixed" else 0.0
            for d in decoders:
                if d.worker_id == p.worker_id:
                    continue  # that is the local option
                if p.role == "mixed" and d.role == "mixed":
                    continue  # never mixed to mixed (see below)
                moved = num_tokens - cached(d)
                ttft = ttft_p + transfer_s(moved, d.link_bytes_per_s, params)
                cost = ttft + stall_p + outputs * itl[d.worker_id]
                options.append(
                    (cost, Placement(p.worker_id, d.worker_id, reason, cost, ttft, cached(p), moved))
                )
                keys.append((p.num_inflight, p.held_blocks, d.num_inflight))
    if not options or disagg_policy == "auto":
        held = max([held, *(cached(w) for w in local if w.worker_id in over_local)])
        for w in local:
            if w.worker_id in over_local:
                continue
            uncached = num_tokens - cached(w)
            ttft = prefill_s(w, uncached, params) + interference_s(w, uncached, params)
            cost = ttft + outputs * itl_s(w, params)
            why = _local_reason(w, senders, disagg_policy)
            options.append((cost, Placement(None, w.worker_id, why, cost, ttft, cached(w), 0)))
            keys.append((w.num_inflight, w.held_blocks, w.num_inflight))
    if not options:
        return None
    scale_s = min(pl.ttft_s for _, pl in options)
    costs = [(c, i) for i, (c, _) in enumerate(options)]
    chosen = options[pick_lowest(costs, params, rng, scale_s, keys)][1]
    if chosen.prefill_id is None and chosen.reason == LOCAL_SHORT:
        chosen = _explain_local(chosen, num_tokens, senders, params)
    if held > chosen.num_cached_tokens:
        chosen = replace(chosen, balanced=True)
    return chosen


def _local_reason(w: WorkerSnapshot, prefill: Sequence[WorkerSnapshot], policy: str) -> str:
    if w.role == "mixed":
        return AGGREGATED
    if not prefill:
        return NO_PREFILL
    if policy == "never":
        return FORCED_LOCAL
    return LOCAL_SHORT  # refined by _explain_local once chosen


def _explain_local(
    chosen: Placement, num_tokens: int, prefill: Sequence[WorkerSnapshot], params: CostParams
) -> Placement:
    """Why local won in ``auto``: mostly cached on D, prefill queues, or a short prompt."""
    if chosen.num_cached_tokens * 2 >= num_tokens:
        reason = LOCAL_CACHED
    else:
        queue_s = min(
            p.queued_prefill_tokens / (p.prefill_rate_tps or params.prefill_rate_tps) for p in prefill
        )
        compute_s = num_tokens / max(p.prefill_rate_tps or params.prefill_rate_tps for p in prefill)
        reason = LOCAL_BUSY if queue_s > compute_s + params.handoff_s else LOCAL_SHORT
    return Placement(
        None, chosen.decode_id, reason, chosen.cost_s, chosen.ttft_s, chosen.num_cached_tokens, 0
    )
