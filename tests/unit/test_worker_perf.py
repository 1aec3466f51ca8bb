"""The link rate the router learns from KV transfers (``WorkerPerf.on_transfer``)."""

from __future__ import annotations

from pdserve.router.worker_perf import WorkerPerf, compute_overlap_s
from pdserve.worker.protocol import PrefillTiming

MB = 1_000_000


def test_a_transfer_streamed_behind_the_compute_does_not_lower_the_link_rate() -> None:
    perf = WorkerPerf()
    perf.on_transfer(20 * MB, 1.0, overlap_s=0.95)  # lasted as long as P's compute: says nothing
    assert perf.link_bytes_per_s is None
    perf.on_transfer(20 * MB, 0.01, overlap_s=0.001)  # the cached part moving: 2 GB/s
    assert perf.link_bytes_per_s == 2000 * MB
    perf.on_transfer(20 * MB, 1.0, overlap_s=0.95)
    assert perf.link_bytes_per_s == 2000 * MB
    perf.on_transfer(20 * MB, 1.0)  # overlap unknown: a lower bound only
    assert perf.link_bytes_per_s == 2000 * MB


def test_transfers_that_outlast_the_compute_update_the_rate() -> None:
    perf = WorkerPerf()
    perf.on_transfer(100 * MB, 1.0, overlap_s=0.1)  # a slow link: 100 MB/s
    assert perf.link_bytes_per_s == 100 * MB
    perf.on_transfer(50 * MB, 1.0, overlap_s=0.0)  # slower now: the estimate follows it down
    assert 50 * MB < perf.link_bytes_per_s < 100 * MB
    perf.on_transfer(5 * MB, 0.01, overlap_s=0.1)  # compute-bound but faster: raises it
    assert perf.link_bytes_per_s == 500 * MB


def test_compute_overlap_from_the_prefill_workers_timing() -> None:
    # received → first push 0.05 s; received → first token 0.01 + 0.3 + 0.02 s: 0.28 s after the push
    timing = PrefillTiming(queue_s=0.01, prefill_s=0.3, kv_push_s=0.02, span_s=0.35, kv_push_start_s=0.05)
    assert abs(compute_overlap_s(timing) - 0.28) < 1e-9  # type: ignore[operator]
    assert compute_overlap_s(None) is None
    assert compute_overlap_s(PrefillTiming(0.0, 0.1, 0.0, 0.1)) is None  # nothing pushed
