"""What the router measures of each worker for the cost model: rates, step times, queued work.

Rates are learned online from the cumulative counters every heartbeat
carries (prompt tokens computed and the time spent in prefill steps; decode
steps, their time and their batch), as exponentially weighted averages of
each interval's figures; the link rate from each ``KVReceived`` (bytes over
the decode worker's measured transfer time). The queued prompt tokens are the
router's own account: charged when it dispatches a prompt, credited when the
first token arrives or the attempt ends (one charge per attempt, credited
once, so the count cannot drift).
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.worker.protocol import WorkerLoad

ALPHA = 0.3  # weight of the newest interval
MIN_BUSY_S = 0.02  # intervals with less measured work than this say little


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - ALPHA) * old + ALPHA * new


@dataclass
class WorkerPerf:
    """One worker's measured speed and the router's queued work on it."""

    prefill_rate_tps: float | None = None
    decode_step_s: float | None = None
    decode_batch: float = 1.0
    link_bytes_per_s: float | None = None
    queued_prefill_tokens: int = 0
    _last: WorkerLoad | None = None

    def on_heartbeat(self, load: WorkerLoad) -> None:
        """Update the rates from the counters' growth since the previous heartbeat."""
        last, self._last = self._last, load
        if last is None or load.num_prefill_tokens < last.num_prefill_tokens:
            return  # first heartbeat, or the worker restarted (its counters did)
        busy_s = load.prefill_busy_s - last.prefill_busy_s
        tokens = load.num_prefill_tokens - last.num_prefill_tokens
        if busy_s >= MIN_BUSY_S and tokens > 0:
            self.prefill_rate_tps = _ewma(self.prefill_rate_tps, tokens / busy_s)
        steps = load.num_decode_steps - last.num_decode_steps
        decode_s = load.decode_busy_s - last.decode_busy_s
        if steps > 0 and decode_s >= MIN_BUSY_S:
            self.decode_step_s = _ewma(self.decode_step_s, decode_s / steps)
            self.decode_batch = _ewma(
                self.decode_batch, (load.num_decode_seqs - last.num_decode_seqs) / steps
            )

    def on_transfer(self, num_bytes: int, transfer_s: float) -> None:
        """A KV transfer into this worker completed."""
        if num_bytes > 0 and transfer_s > 0:
            self.link_bytes_per_s = _ewma(self.link_bytes_per_s, num_bytes / transfer_s)
