"""How a worker's speed changes with its torch thread count, measured on this machine.

With ``pdserve serve --planner slo --max-cores C`` (and no ``--threads-per-worker``)
the planner chooses the threads of the workers as well as their number: one
mixed worker with two threads and two with one thread each cost the same two
cores, and which serves a load better depends on how this model's steps scale
with threads here (a two-thread prefill takes about half the time on a compute
bound CPU; a small model's decode step gains less). The planner measures its
speeds on the traffic at the thread count in place; a shape at another count
is predicted from those speeds scaled by this table (:meth:`ThreadScaling.scale`).

The table is measured by ``pdserve serve`` before it starts any worker, while
the machine is quiet, in a child process (:func:`measure`, ``python -m
pdserve.planner.thread_scaling``): the real engine with the workers' engine
options, for each thread count, after a warm-up,

* **prefill**: one prompt of up to ``PREFILL_TOKENS`` tokens (one chunk), the
  median of ``REPEATS`` runs → prompt tokens per second;
* **decode**: batches of 1 and ``DECODE_BATCH`` sequences, the median of
  their decode-only steps → a step at batch one (``step_s``) and what each
  more sequence adds (``per_seq_s``), the planner's decode model.

On a GPU threads do not set the speed, and no table is measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pdserve.planner.predict import Speeds

logger = logging.getLogger(__name__)

PREFILL_TOKENS = 512
DECODE_BATCH = 16
DECODE_PROMPT = 64
REPEATS = 3
DECODE_STEPS = 12  # steps per decode run; the first two (prefill, first decode) are not timed


@dataclass(frozen=True)
class ThreadSpeed:
    """One thread count's measured speeds (seconds, tokens per second)."""

    prefill_tps: float
    step_s: float  # a decode step at batch one
    per_seq_s: float  # what each more sequence adds to a decode step


@dataclass(frozen=True)
class ThreadScaling:
    """Measured :class:`ThreadSpeed` per thread count (see the module docstring)."""

    speeds: Mapping[int, ThreadSpeed]

    @property
    def threads(self) -> tuple[int, ...]:
        """The thread counts measured, ascending."""
        return tuple(sorted(self.speeds))

    def scale(self, speeds: Speeds, from_threads: int, to_threads: int) -> Speeds:
        """``speeds`` measured at ``from_threads``, predicted at ``to_threads`` (unchanged when
        the counts are equal or either was not measured, 0 among them: not known)."""
        a, b = self.speeds.get(from_threads), self.speeds.get(to_threads)
        if a is None or b is None or from_threads == to_threads:
            return speeds
        faster = b.prefill_tps / a.prefill_tps  # prompt work per second
        step = b.step_s / a.step_s
        # a per-sequence cost too small to measure on either side scales like the whole step
        per_seq = b.per_seq_s / a.per_seq_s if min(a.per_seq_s, b.per_seq_s) > 0 else step
        chunk = speeds.chunk_fit
        if chunk is not None:
            chunk = dataclasses.replace(chunk, step_s=chunk.step_s / faster, token_s=chunk.token_s / faster,
                                        pair_s=chunk.pair_s / faster)
        return dataclasses.replace(
            speeds,
            prefill_tps=speeds.prefill_tps * faster,
            prefill_per_pair_s=speeds.prefill_per_pair_s / faster,
            step_s=speeds.step_s * step,
            per_seq_s=speeds.per_seq_s * per_seq,
            chunk_fit=chunk,
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (thread counts as string keys)."""
        return {str(t): dataclasses.asdict(s) for t, s in sorted(self.speeds.items())}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ThreadScaling:
        """The inverse of :meth:`as_dict`; raises ValueError on a malformed table."""
        try:
            speeds = {int(t): ThreadSpeed(float(s["prefill_tps"]), float(s["step_s"]), float(s["per_seq_s"]))
                      for t, s in data.items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a thread-scaling table: {exc}") from exc
        if not speeds or any(t < 1 or s.prefill_tps <= 0 or s.step_s <= 0 for t, s in speeds.items()):
            raise ValueError("a thread-scaling table needs thread counts >= 1 with positive speeds")
        return cls(speeds)


def measure(engine_argv: Sequence[str], threads: Sequence[int], timeout_s: float = 300.0
            ) -> ThreadScaling | None:
    """Measure the table in a child process with ``engine_argv`` (``pdserve worker``'s engine
    options; others are ignored) at each of ``threads``; None on a GPU or when it fails (logged)."""
    cmd = [sys.executable, "-m", "pdserve.planner.thread_scaling", "--threads", *map(str, threads),
           "--", *engine_argv]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("thread scaling not measured: %s", exc)
        return None
    if done.returncode != 0:
        logger.warning("thread scaling not measured (exit %d): %s", done.returncode,
                       done.stderr.strip()[-500:])
        return None
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return None if data is None else ThreadScaling.from_dict(data)


def _median_steps(engine: Any, prompts: list[list[int]], max_tokens: int, skip: int) -> float:
    """Add ``prompts``, step the engine to the end; the median time of the steps after ``skip``."""
    from pdserve.sampling_params import SamplingParams

    for ids in prompts:
        engine.add_request(ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    times = []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[skip:] or times)


def measure_here(engine_argv: Sequence[str], threads: Sequence[int]) -> ThreadScaling | None:
    """Measure the table in this process (it sets torch's thread count); None on a GPU."""
    import torch

    from pdserve.cli import add_engine_args, engine_options
    from pdserve.engine.engine import LLMEngine
    from pdserve.engine.llm import make_engine_config

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args, _ = parser.parse_known_args(list(engine_argv))
    config = make_engine_config(args.model, **engine_options(args))
    engine = LLMEngine(config, detokenize=False)
    if engine.runner.device.type != "cpu":
        return None
    vocab = engine.arch.vocab_size
    n = max(min(PREFILL_TOKENS, config.scheduler.chunk_size, engine.max_model_len - 8), 8)

    def prompt(length: int, seed: int) -> list[int]:
        return [3 + (seed * 7919 + i * 104729) % (vocab - 3) for i in range(length)]

    out: dict[int, ThreadSpeed] = {}
    seeds = iter(range(1, 1 << 30))  # every prompt distinct: nothing comes from the prefix cache
    for t in threads:
        torch.set_num_threads(t)
        _median_steps(engine, [prompt(64, next(seeds))], 4, 0)  # warm-up at this count
        prefill = [_median_steps(engine, [prompt(n, next(seeds))], 1, 0) for _ in range(REPEATS)]
        one = _median_steps(engine, [prompt(DECODE_PROMPT, next(seeds))], DECODE_STEPS, 2)
        batch = [prompt(DECODE_PROMPT, next(seeds)) for _ in range(DECODE_BATCH)]
        many = _median_steps(engine, batch, DECODE_STEPS, 2)
        per_seq = max((many - one) / (DECODE_BATCH - 1), 0.0)
        out[t] = ThreadSpeed(prefill_tps=n / statistics.median(prefill), step_s=one, per_seq_s=per_seq)
    return ThreadScaling(out)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pdserve.planner.thread_scaling --threads 1 2 -- ENGINE OPTIONS``: print the
    table as one JSON line (``null`` on a GPU)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    engine_argv = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m pdserve.planner.thread_scaling")
    parser.add_argument("--threads", type=int, nargs="+", required=True)
    args = parser.parse_args(own)
    if any(t < 1 for t in args.threads):
        parser.error("thread counts must be >= 1")
    table = measure_here(engine_argv, args.threads)
    print(json.dumps(None if table is None else table.as_dict()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
