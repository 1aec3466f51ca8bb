"""S3's load: the seeded workload every configuration is sent, unloaded and at each rate.

:class:`Bench` holds the workload and the client settings; :meth:`Bench.unloaded` times
typical requests one at a time (the SLO's reference), :meth:`Bench.at_rate` sends the
workload with Poisson arrivals.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace

from s3_setups import MODEL

from pdserve.bench.arrivals import ArrivalConfig
from pdserve.bench.client import ClientConfig
from pdserve.bench.metrics import SLO, Summary
from pdserve.bench.runner import LoadConfig, RunResult, run_load
from pdserve.bench.workload import LengthDist, TokenCounter, WorkloadConfig, make_counter, make_workload


def median_tokens(dist: LengthDist) -> int:
    """A typical length: the fixed length, the middle of a uniform range or a lognormal's median."""
    if dist.kind == "uniform":
        return round((dist.a + dist.b) / 2)
    return max(dist.lo, min(dist.hi, round(dist.a)))


@dataclass(frozen=True)
class Bench:
    """What every configuration is sent: the workload, the typical request and the client settings."""

    workload: WorkloadConfig
    counter: TokenCounter
    typical_prompt_tokens: int
    typical_output_tokens: int
    args: argparse.Namespace

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Bench:
        workload = WorkloadConfig(kind=args.workload, input_len=args.input_len, output_len=args.output_len,
                                  seed=args.seed)
        prompt, output = workload.lengths()
        # pdserve's own tokenizer: prompt lengths are exact token counts (the server adds a BOS)
        return cls(workload, make_counter(MODEL), median_tokens(prompt), median_tokens(output), args)

    def client(self, url: str) -> ClientConfig:
        return ClientConfig(base_url=url, model=MODEL, extra_body={"temperature": 0.0},
                            timeout_s=self.args.request_timeout)

    async def unloaded(self, url: str) -> Summary:
        """Typical requests one at a time on an idle deployment (the first is a warm-up)."""
        typical = replace(self.workload, kind="synthetic", input_len=str(self.typical_prompt_tokens),
                          output_len=str(self.typical_output_tokens), seed=self.args.seed + 1)
        load = LoadConfig(arrivals=ArrivalConfig(rate=math.inf), num_requests=self.args.calibration_requests,
                          max_concurrency=1, warmup_requests=1, progress=False)
        run = await run_load(self.client(url), load, make_workload(typical, self.counter), None, self.counter)
        return run.summary

    async def at_rate(self, url: str, rate: float, slo: SLO) -> RunResult:
        """The seeded workload with Poisson arrivals at ``rate``; waits for every request."""
        load = LoadConfig(arrivals=ArrivalConfig(rate=rate, kind="poisson", seed=self.args.seed),
                          num_requests=self.args.num_requests, warmup_requests=self.args.warmup_requests,
                          progress=False)
        return await run_load(self.client(url), load, make_workload(self.workload, self.counter), slo,
                              self.counter)
