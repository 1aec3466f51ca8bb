"""Typed messages between the router and the workers (msgpack over ZeroMQ).

The router binds one ROUTER socket; every worker connects a DEALER socket
whose identity is its worker id. All messages are tagged msgspec Structs, so
one decoder reads any of them.

Path of a disaggregated request (P = prefill worker, D = decode worker):

1. router → D ``DecodeRequest``; router → P ``PrefillRequest`` (same moment).
2. D reserves blocks → router ``Reserved`` → P ``Blocks`` (where to write).
3. P prefills and pushes each layer's KV into D's blocks as it is computed;
   P → router ``Tokens`` with the first token (TTFT does not wait for D).
4. P → D (on the KV channel) "done" with the first token; D joins the
   request to its batch and sends ``KVReceived``; router → P ``Release``.
5. D → router ``Tokens`` for every later token, the last with ``finished``.

Aggregated mode sends only ``PrefillRequest`` (no decode worker) to a mixed
worker, which streams every token itself; so does conditional disaggregation
to a decode worker that prefills a prompt itself.

Every worker also sends ``KVEvents`` (its prefix cache's changes, numbered
per epoch) after each step, and a ``KVSnapshot`` when the router asks
(``KVSnapshotRequest``) because its cache index lost track.
"""

from __future__ import annotations

import msgspec

from pdserve.sampling_params import SamplingParams
from pdserve.transfer.descriptor import KVDescriptor


class WireSamplingParams(msgspec.Struct, frozen=True):
    """The token-level sampling parameters a worker needs (stop strings stay at the router)."""

    max_tokens: int
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None

    @classmethod
    def from_params(cls, p: SamplingParams) -> WireSamplingParams:
        """Drop what only the router uses (stop strings)."""
        return cls(
            max_tokens=p.max_tokens,
            min_tokens=p.min_tokens,
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            min_p=p.min_p,
            seed=p.seed,
            stop_token_ids=list(p.stop_token_ids),
            ignore_eos=p.ignore_eos,
            logprobs=p.logprobs,
        )

    def to_params(self) -> SamplingParams:
        """Back to engine sampling parameters (without stop strings)."""
        return SamplingParams(
            max_tokens=self.max_tokens,
            min_tokens=self.min_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            seed=self.seed,
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs,
        )


class WorkerLoad(msgspec.Struct):
    """Load a worker reports in every heartbeat."""

    num_running: int = 0
    num_waiting: int = 0
    num_waiting_for_kv: int = 0
    num_held: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    num_cached_blocks: int = 0
    # Cumulative counters the router turns into rates (the cost model's inputs):
    num_prefill_tokens: int = 0  # prompt tokens computed (cache hits excluded)
    prefill_busy_s: float = 0.0  # time in steps that computed prompt tokens
    num_prefill_steps: int = 0  # those steps
    num_decode_steps: int = 0  # steps that computed only decode tokens
    decode_busy_s: float = 0.0  # time in those steps
    num_decode_seqs: int = 0  # sequences those steps computed, summed over steps
    prefix_query_tokens: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int = 0  # of those, found cached
    # Rate matching between the pools (cumulative):
    num_deferred_reservations: int = 0  # decode: reservations that had to wait for room
    num_gate_waits: int = 0  # prefill: requests that could have run but waited for their KV's home
    num_prefix_waits: int = 0  # requests that waited for a prefix another request was computing
    threads: int = 0  # torch threads it computes with now (``SetThreads`` changes them)


# -- worker → router -----------------------------------------------------------------


class Register(msgspec.Struct, tag=True):
    """A worker announces itself (and re-announces after a router restart)."""

    worker_id: str
    role: str
    model: str
    pid: int
    host_id: str
    max_model_len: int
    block_size: int
    num_blocks: int
    kv: KVDescriptor | None = None
    secret: str = ""
    metrics_port: int = 0  # where the worker serves /metrics on its host (0: not served)
    hash_scheme: str = ""  # block hashing of its prefix cache (pdserve.block_hash.HASH_SCHEME)
    prefix_caching: bool = True
    kv_epoch: int = 0  # changes whenever the worker (and its cache) starts afresh
    threads: int = 0  # torch threads it computes with (0: not reported)


class Heartbeat(msgspec.Struct, tag=True):
    """Periodic liveness and load report."""

    worker_id: str
    load: WorkerLoad
    kv_epoch: int = 0
    kv_seq: int = 0  # sequence number of the last KVEvents sent (a lost batch shows as a gap)


class PrefillTiming(msgspec.Struct):
    """Where a request's time went on the worker that prefilled it, up to its first token.

    Durations on the worker's own clock (no clock needs to agree with the router's):

    Attributes:
        queue_s: request message received → start of the first step that computed it
            (setting the request up, e.g. a first connection to its decode peer, included).
        prefill_s: that step's start → first token sampled, less ``kv_push_s``.
        kv_push_s: time those steps spent pushing KV to the decode worker
            (compute waited for it: the transfer's share of TTFT).
        span_s: request received → this message sent.
        kv_push_start_s: request received → first KV push; None when nothing was pushed.
    """

    queue_s: float
    prefill_s: float
    kv_push_s: float
    span_s: float
    kv_push_start_s: float | None = None


class Tokens(msgspec.Struct, tag=True):
    """New output tokens of a request; ``start`` is the index of the first one in the output.

    ``timing`` rides on the first message after a prefill (see :class:`PrefillTiming`).
    """

    request_id: str
    start: int
    token_ids: list[int]
    logprobs: list[tuple[int, float, dict[int, float]]] | None = None
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    timing: PrefillTiming | None = None


class Reserved(msgspec.Struct, tag=True):
    """Decode worker: blocks reserved for a request's KV."""

    request_id: str
    block_ids: list[int]
    num_cached_tokens: int = 0  # leading tokens whose KV the decode worker already holds


class KVEvent(msgspec.Struct, array_like=True, frozen=True):
    """One change to a worker's prefix cache: ``kind`` 0 stored, 1 removed, 2 all cleared."""

    kind: int
    block_hash: int
    parent_hash: int | None = None


class KVEvents(msgspec.Struct, tag=True):
    """A step's prefix-cache changes, in order; ``seq`` counts batches from 1 per ``epoch``."""

    worker_id: str
    epoch: int
    seq: int
    events: list[KVEvent]


class KVSnapshot(msgspec.Struct, tag=True):
    """Every cached block hash (with its parent's) as of batch ``seq``: the answer to a resync."""

    worker_id: str
    epoch: int
    seq: int
    blocks: list[tuple[int, int | None]]


class KVReceived(msgspec.Struct, tag=True):
    """Decode worker: the whole prompt KV arrived; the prefill side may free it."""

    request_id: str
    num_bytes: int
    transfer_s: float


class RequestFailed(msgspec.Struct, tag=True):
    """A worker could not serve a request; ``message`` is safe to show a client."""

    request_id: str
    message: str
    code: int = 500


class Draining(msgspec.Struct, tag=True):
    """The worker is shutting down: no new requests; it finishes those it has."""

    worker_id: str


class WorkerStats(msgspec.Struct, tag=True):
    """Answer to ``GetStats``: counters for tests, metrics and ``pdserve status``."""

    worker_id: str
    role: str
    load: WorkerLoad
    num_prompt_tokens_computed: int
    num_steps: int
    kv_bytes_sent: int = 0
    kv_bytes_received: int = 0
    kv_transfers: int = 0
    transports: list[str] = []
    kv_events: int = 0  # prefix-cache events published
    kv_event_batches: int = 0
    kv_event_bytes: int = 0  # encoded KVEvents and KVSnapshot messages
    kv_event_cpu_s: float = 0.0  # collecting and encoding them
    kv_snapshots: int = 0


# -- router → worker ------------------------------------------------------------------


class PrefillRequest(msgspec.Struct, tag=True):
    """Prefill a prompt; hand the KV to ``decode_worker_id``.

    With no decode worker the receiver generates the whole request itself: a
    mixed worker, or a decode worker (conditional disaggregation, or the
    fallback when no prefill worker can do it). With one, a prefill or mixed
    worker computes the prompt and pushes its KV there. ``output_token_ids`` resume a migrated request: its KV
    is recomputed over prompt + outputs and sampling continues at the next
    output index (the same seed gives the same continuation).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: WireSamplingParams
    decode_worker_id: str | None = None
    decode_kv: KVDescriptor | None = None
    output_token_ids: list[int] = []


class DecodeRequest(msgspec.Struct, tag=True):
    """Reserve blocks for a request whose KV the prefill (or mixed) worker will push, then decode it.

    Decode and mixed workers take it.

    ``output_token_ids`` are the tokens a migrated request already produced.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: WireSamplingParams
    prefill_worker_id: str
    output_token_ids: list[int] = []


class Blocks(msgspec.Struct, tag=True):
    """Where the decode worker wants a request's KV written."""

    request_id: str
    block_ids: list[int]
    num_cached_tokens: int = 0  # the decode worker holds these leading tokens already: skip them


class Release(msgspec.Struct, tag=True):
    """The decode worker has the KV: free the held blocks."""

    request_id: str


class Abort(msgspec.Struct, tag=True):
    """Stop a request and free its KV."""

    request_id: str


class GetStats(msgspec.Struct, tag=True):
    """Ask for a ``WorkerStats`` answer."""


class Registered(msgspec.Struct, tag=True):
    """The router accepted a registration."""

    worker_id: str
    heartbeat_interval_s: float


class PeerLost(msgspec.Struct, tag=True):
    """A worker is gone: blocks reserved for KV it was writing can be freed."""

    worker_id: str


class KVSnapshotRequest(msgspec.Struct, tag=True):
    """The router's cache index lost track of this worker: send a ``KVSnapshot``."""


class RegisterRefused(msgspec.Struct, tag=True):
    """The router cannot use this worker (e.g. its block size or hashing differs); it exits."""

    reason: str


class Ping(msgspec.Struct, tag=True):
    """Liveness probe: the router learns at once when a worker's connection is gone."""


class Reregister(msgspec.Struct, tag=True):
    """The router does not know this worker (it restarted): register again."""


class Shutdown(msgspec.Struct, tag=True):
    """Drain and exit."""


class Flip(msgspec.Struct, tag=True):
    """Drain, then serve as ``role`` with the same weights and register again under it."""

    role: str


class SetThreads(msgspec.Struct, tag=True):
    """Compute with ``threads`` torch threads from the next step on (a flip keeps them)."""

    threads: int


Message = (
    Draining
    | Ping
    | PeerLost
    | Register
    | Heartbeat
    | Tokens
    | Reserved
    | KVReceived
    | RequestFailed
    | WorkerStats
    | PrefillRequest
    | DecodeRequest
    | Blocks
    | Release
    | Abort
    | GetStats
    | Registered
    | Reregister
    | Shutdown
    | Flip
    | SetThreads
    | KVEvents
    | KVSnapshot
    | KVSnapshotRequest
    | RegisterRefused
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    """Serialise one message."""
    return _encoder.encode(message)


def decode(data: bytes) -> Message:
    """Parse one message; raises ``msgspec.DecodeError`` on garbage."""
    return _decoder.decode(data)
