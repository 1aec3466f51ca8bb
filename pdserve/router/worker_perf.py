"""What the router measures of each worker for the cost model: rates, step times, queued work.

Rates are learned online from the cumulative counters every heartbeat
carries (prompt tokens computed and the time spent in prefill steps; decode
steps, their time and their batch), as exponentially weighted averages of
each interval's figures; the link rate from each ``KVReceived`` (bytes over
the decode worker's measured transfer time, first byte to done). A transfer
streamed layer by layer behind the prompt's compute lasts as long as that
compute, whatever the link: its bytes/time says how fast P computed. Only a
transfer that outlasted the compute it overlapped by ``LINK_BOUND`` × (the
cached part of a prompt moving, say) measures the link; the others only
show that the link is at least that fast (:meth:`WorkerPerf.on_transfer`). The queued prompt tokens are the
router's own account: charged when it dispatches a prompt, credited when the
first token arrives or the attempt ends (one charge per attempt, credited
once, so the count cannot drift). What is left of them at a given moment
(:meth:`WorkerPerf.queued_at`) counts the worker as computing its charges one
after another at its measured rate since each was dispatched: a prompt that has
been computing for most of its predicted time is mostly done, so a second
request for the same document can wait for it rather than compute it again
elsewhere (S6's cache-pressure load).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.router.step_fit import StepFit
from pdserve.worker.protocol import PrefillTiming, WorkerLoad

ALPHA = 0.3  # weight of the newest interval
MIN_BUSY_S = 0.02  # intervals with less measured work than this say little
LINK_BOUND = 2.0  # a transfer this many times longer than the compute it overlapped measures the link


def compute_overlap_s(timing: PrefillTiming | None) -> float | None:
    """How long the prefill worker computed after its first KV push (None: unknown, nothing pushed).

    From its :class:`PrefillTiming` (durations on its own clock): request
    received → first token sampled, less request received → first push.
    """
    if timing is None or timing.kv_push_start_s is None:
        return None
    return max(timing.queue_s + timing.prefill_s + timing.kv_push_s - timing.kv_push_start_s, 0.0)


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - ALPHA) * old + ALPHA * new


@dataclass
class WorkerPerf:
    """One worker's measured speed and the router's queued work on it."""

    prefill_rate_tps: float | None = None
    decode_step_s: float | None = None
    decode_batch: float = 1.0
    link_bytes_per_s: float | None = None
    queued_prefill_tokens: int = 0  # charged and not credited yet
    prefill_fit: StepFit = field(default_factory=StepFit)  # per step + per token (step_fit.py)
    decode_fit: StepFit = field(default_factory=StepFit)  # per step + per sequence of the batch
    _last: WorkerLoad | None = None
    _charges: dict[int, tuple[int, float]] = field(default_factory=dict)  # id → (tokens, charged at)
    _next_charge: int = 0

    def charge(self, num_tokens: int, now_s: float) -> int:
        """Count ``num_tokens`` prompt tokens dispatched to it at ``now_s``; returns the charge's id."""
        self._next_charge += 1
        self._charges[self._next_charge] = (num_tokens, now_s)
        self.queued_prefill_tokens += num_tokens
        return self._next_charge

    def credit(self, charge_id: int) -> None:
        """The charge's prompt is computed, or its attempt ended (a second credit does nothing)."""
        tokens, _ = self._charges.pop(charge_id, (0, 0.0))
        self.queued_prefill_tokens = max(self.queued_prefill_tokens - tokens, 0)

    def queued_at(self, now_s: float, tokens_per_s: float | None) -> int:
        """Prompt tokens predicted still to compute at ``now_s``: the charges computed in order from
        their dispatch at ``tokens_per_s`` (None: no rate known, nothing counted as done)."""
        if not tokens_per_s or tokens_per_s <= 0:
            return self.queued_prefill_tokens
        free_at = -float("inf")  # when the worker is predicted through the earlier charges
        left = 0.0
        for tokens, at in self._charges.values():
            free_at = max(free_at, at) + tokens / tokens_per_s
            left += min(tokens, max(free_at - now_s, 0.0) * tokens_per_s)
        return round(left)

    def forget_speed(self) -> None:
        """Drop the measured rates and step times (the worker changed its thread count).

        The router's queued charges stay (they are its own account of work sent);
        the link rate stays too. Rates are learned afresh from the next interval
        on: the counters' baseline is reset, so the interval in which the change
        happened (partly at the old speed) counts for nothing.
        """
        self.prefill_rate_tps = None
        self.decode_step_s = None
        self.decode_batch = 1.0
        self.prefill_fit = StepFit()
        self.decode_fit = StepFit()
        self._last = None

    def on_heartbeat(self, load: WorkerLoad) -> None:
        """Update the rates from the counters' growth since the previous heartbeat."""
        last, self._last = self._last, load
        if last is None or load.num_prefill_tokens < last.num_prefill_tokens:
            return  # first heartbeat, or the worker restarted (its counters did)
        busy_s = load.prefill_busy_s - last.prefill_busy_s
        tokens = load.num_prefill_tokens - last.num_prefill_tokens
        if busy_s >= MIN_BUSY_S and tokens > 0:
            self.prefill_rate_tps = _ewma(self.prefill_rate_tps, tokens / busy_s)
            self.prefill_fit.add(load.num_prefill_steps - last.num_prefill_steps, tokens, busy_s)
        steps = load.num_decode_steps - last.num_decode_steps
        decode_s = load.decode_busy_s - last.decode_busy_s
        if steps > 0 and decode_s >= MIN_BUSY_S:
            seqs = load.num_decode_seqs - last.num_decode_seqs
            self.decode_step_s = _ewma(self.decode_step_s, decode_s / steps)
            self.decode_batch = _ewma(self.decode_batch, seqs / steps)
            self.decode_fit.add(steps, seqs, decode_s)

    def on_transfer(self, num_bytes: int, transfer_s: float, overlap_s: float | None = None) -> None:
        """A KV transfer into this worker completed.

        ``transfer_s``: first byte to done; ``overlap_s``: how much of it the
        prefill worker spent computing the prompt (its first push to its first
        token; None: not known). When the transfer outlasted that compute by
        ``LINK_BOUND`` ×, the link set its pace: the sample updates the rate.
        Otherwise the compute did, and the sample is only a lower bound: it
        can raise the rate, never lower it (S6 measured 15 MB/s "links" on
        shared memory that way, and the cost model then computed 1,200-token
        prompts from scratch on D rather than move a cached document's KV).
        """
        if num_bytes <= 0 or transfer_s <= 0:
            return
        sample = num_bytes / transfer_s
        if overlap_s is not None and transfer_s >= LINK_BOUND * max(overlap_s, 0.0):
            self.link_bytes_per_s = _ewma(self.link_bytes_per_s, sample)
        elif self.link_bytes_per_s is not None and sample > self.link_bytes_per_s:
            self.link_bytes_per_s = sample
