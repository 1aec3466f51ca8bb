"""Co-location: how much slower a worker's steps are while another worker on the same host computes.

Two worker processes on one CPU host share its caches and memory bandwidth
(and, with more threads than cores, the cores): a step takes longer while the
other worker is in a step of its own than while it waits. ``pdserve profile``
measures it (:func:`measure_co_location`) and the simulator applies it
(:meth:`CoLocation.factor`, see :mod:`pdserve.sim.simulator`):

1. engine B, in another process with the profile's thread count, is built and
   either idle, computing continuously (*busy*: a batch of 4 prompts of 128
   tokens, 16 tokens out each, again and again: prompt and decode steps, as
   a served worker runs), or decoding only (*decoding*: one 128-token prompt
   then :data:`DECODING_TOKENS` decode-only steps, again and again);
2. engine A, in this process with the same threads, runs a fixed set of
   steps — two single prompts (64 and 256 tokens) and decode batches of 1, 4
   and 8 rows (with their prompt steps) — once per condition per round, the
   order of the conditions reversed every other round (a warm-up round is
   not kept);
3. per step shape, the ratio of its median time with B busy to its median
   time with B idle; per kind of step (``prefill``: computes prompt tokens,
   ``decode``: decodes only), the median of those ratios; and the same over
   decode shapes with B decoding (:attr:`CoLocation.decode_beside_decode`:
   two decoding workers share the memory bandwidth that both are bound by,
   and slow each other more than a decode beside a prompt step);
4. the CPU the host's *other* processes used meanwhile (``/proc/stat`` less A's
   and B's own CPU time, in cores): on a busy host the figure includes
   time-slicing with them, not only the two engines' interference.

A profile without the figure (older than it) loads as no slowdown (1.0).

The served figure (:func:`served_co_location`): the engine pair above misses
much of what a served prefill step suffers beside a decoding worker — in the
S8 runs of 2026-12-07 the served prompt steps took ×1.16–1.21 longer while
the other one-thread worker was in a step (agg2 and 1 prefill + 1 decode
alike) where the engine pair measured ×1.00–1.08 minutes before (a served
decode worker streams a token every ~9 ms: its loop, the router's and the
client's wake-ups come with it). So ``pdserve profile`` also reads the step
logs of its hand-off probe (:mod:`pdserve.sim.serving_probe`) and the
profile's :attr:`~pdserve.sim.profile.Profile.co_location` takes the prefill
factor from there when it was measured (:data:`MIN_SERVED_STEPS` steps in
each condition); the decode factor stays the engine pair's (the probe only
sees decode steps beside prompt steps, the engine pair also beside decoding).
"""

from __future__ import annotations

import bisect
import multiprocessing as mp
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from pdserve.config import EngineConfig
from pdserve.sim.step_model import ShapeHooks, StepModel, StepShape

if TYPE_CHECKING:
    from pdserve.worker.step_log import LoggedStep  # (its module imports the engine: not at run time)

KINDS = ("prefill", "decode")

METHOD = ("engine A (this process) times a fixed set of steps (prompts of 64 and 256 tokens; decode batches "
          "of 1, 4, 8 with their prompt steps) while engine B in another process on the same host, with "
          "the same threads, computes continuously (batches of 4 × 128-token prompts, 16 tokens out) vs "
          "waits; per step shape median(B computing) / median(B idle); per kind the median over shapes; "
          "conditions alternate over rounds")


def step_kind(shape: StepShape) -> str:
    """``prefill`` for a step that computes prompt tokens (a mixed step too), else ``decode``."""
    return "prefill" if shape.num_prefill_tokens > 0 else "decode"


@dataclass(frozen=True)
class CoLocation:
    """Slowdown of one worker's steps while another worker on its host computes (1.0: none).

    Attributes:
        prefill: factor on a step that computes prompt tokens.
        decode: factor on a decode-only step.
        other_threads: torch threads of the other worker when it was measured.
        num_samples: timed steps per kind (both conditions together).
        method: how it was measured ("" when not measured).
        other_cpu_cores: CPU the host's other processes used during the measurement, in cores
            (None: unknown); well above 0, the figure includes time-slicing with them.
        decode_beside_decode: factor on a decode-only step while the other worker is in a decode-only
            step (engine B decoding only; None: not measured, :attr:`decode` applies). Two decoding
            workers contend for memory bandwidth more than a decode beside a prompt step does.
    """

    prefill: float = 1.0
    decode: float = 1.0
    other_threads: int = 0
    num_samples: dict[str, int] = field(default_factory=dict)
    method: str = ""
    other_cpu_cores: float | None = None
    decode_beside_decode: float | None = None

    def factor(self, shape: StepShape, other: str | None = None) -> float:
        """The slowdown of a step of ``shape`` while another worker of its host is computing: a step of
        kind ``other`` (``"decode"``, ``"prefill"``; None: unknown). A decode step beside a decoding
        worker takes :attr:`decode_beside_decode` when it was measured; otherwise a step takes its
        kind's factor."""
        if step_kind(shape) == "prefill":
            return self.prefill
        if other == "decode" and self.decode_beside_decode is not None:
            return self.decode_beside_decode
        return self.decode

    def to_json(self) -> dict[str, Any]:
        """The profile's ``co_located`` entry."""
        return {"prefill": self.prefill, "decode": self.decode, "other_threads": self.other_threads,
                "num_samples": dict(self.num_samples), "method": self.method,
                "other_cpu_cores": self.other_cpu_cores,
                **({"decode_beside_decode": self.decode_beside_decode}
                   if self.decode_beside_decode is not None else {})}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CoLocation:
        """Inverse of :meth:`to_json`."""
        other, dd = data.get("other_cpu_cores"), data.get("decode_beside_decode")
        return cls(float(data["prefill"]), float(data["decode"]), int(data.get("other_threads", 0)),
                   {k: int(v) for k, v in data.get("num_samples", {}).items()}, str(data.get("method", "")),
                   None if other is None else float(other), None if dd is None else float(dd))


def _cpu_s(pids: tuple[int, ...]) -> tuple[float, float] | None:
    """(CPU seconds of every process on the host, of ``pids``) from /proc; None where it is not there."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]  # user … steal (guest is in user)
        total = sum(fields) - fields[3] - fields[4]  # less idle and iowait
        own = 0
        for pid in pids:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
            own += int(stat[11]) + int(stat[12])  # utime, stime
        return total / tick, own / tick
    except (OSError, ValueError, IndexError):
        return None


def _run(engine: Any, rng: random.Random, prompts: list[int], max_tokens: int,
         hooks: ShapeHooks | None = None) -> list[tuple[StepShape, float]]:
    """Run requests of these prompt lengths to their end; each step's shape and seconds."""
    from pdserve.sampling_params import SamplingParams

    vocab = engine.arch.vocab_size
    for n in prompts:
        engine.add_request([rng.randrange(3, vocab) for _ in range(n)],
                           SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    timed = []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step(hooks=hooks)
        dt = time.perf_counter() - t0
        if hooks is not None and hooks.shape is not None:
            timed.append((hooks.shape, dt))
            hooks.shape = None
    return timed


def _other_main(config: EngineConfig, threads: int, conn: Any) -> None:
    """Engine B: idle until told ``busy`` (prompts and decodes, as a served worker runs) or ``decoding``
    (one long generation: decode-only steps), then computing step after step until told ``idle``."""
    import torch

    from pdserve.engine.engine import LLMEngine
    from pdserve.sampling_params import SamplingParams

    torch.set_num_threads(threads)
    engine = LLMEngine(config, detokenize=False)
    rng = random.Random(1)
    vocab = engine.arch.vocab_size
    _run(engine, rng, [128] * 4, 4)  # warm-up
    conn.send("ready")
    mode, live = "idle", list[str]()  # B's requests in flight (unknown ones are ignored by abort)
    while True:
        if mode == "idle" or conn.poll():
            msg = conn.recv()
            if msg == "stop":
                break
            if msg != mode:  # a new mode starts from an empty engine
                for request_id in live:
                    engine.abort_request(request_id)
                live.clear()
            mode = msg
            conn.send(msg)  # acknowledged: from now on B computes (or waits)
            continue
        if not engine.has_unfinished_requests():
            live.clear()
            if mode == "decoding":  # one prompt step, then DECODING_TOKENS decode-only steps
                live.append(engine.add_request([rng.randrange(3, vocab) for _ in range(128)],
                                               SamplingParams(max_tokens=DECODING_TOKENS,
                                                              ignore_eos=True)).request_id)
            else:
                live += [engine.add_request([rng.randrange(3, vocab) for _ in range(128)],
                                            SamplingParams(max_tokens=16, ignore_eos=True)).request_id
                         for _ in range(4)]
        engine.step()


#: Tokens engine B generates per request in the ``decoding`` condition (a prompt step every this many).
DECODING_TOKENS = 512


def measure_co_location(config: EngineConfig, threads: int, rounds: int = 3,
                        progress: Callable[[str], None] = lambda s: None) -> CoLocation:
    """Time engine A's steps with engine B (another process, same host, same threads) idle vs computing."""
    from pdserve.engine.engine import LLMEngine

    # random prompts: a prefix cache would never hit; off, so nothing depends on it
    config = replace(config, cache=replace(config.cache, enable_prefix_caching=False))
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_other_main, args=(config, threads, child), daemon=True)
    proc.start()
    try:
        engine = LLMEngine(config, detokenize=False)
        rng, hooks = random.Random(0), ShapeHooks()

        def one_round() -> list[tuple[StepShape, float]]:
            timed = []
            for n in (64, 256):
                timed += _run(engine, rng, [n], 1, hooks)
            for b in (1, 4, 8):
                timed += _run(engine, rng, [32] * b, 4, hooks)
            return timed

        one_round()  # warm-up, not kept
        if conn.recv() != "ready":
            raise RuntimeError("the co-located engine did not start")
        samples: dict[str, dict[StepShape, list[float]]] = {"idle": {}, "busy": {}, "decoding": {}}
        pids = (os.getpid(), proc.pid or 0)
        cpu0, wall0 = _cpu_s(pids), time.monotonic()
        for rep in range(rounds):
            conditions = ("idle", "busy", "decoding")
            for cond in (conditions if rep % 2 == 0 else conditions[::-1]):
                progress(f"co-location round {rep + 1}/{rounds}: the other engine {cond}")
                conn.send(cond)
                conn.recv()
                for shape, dt in one_round():
                    samples[cond].setdefault(shape, []).append(dt)
        conn.send("idle")
        conn.recv()
        cpu1, wall = _cpu_s(pids), time.monotonic() - wall0
    finally:
        conn.send("stop")
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    other = None
    if cpu0 is not None and cpu1 is not None:
        other = max((cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1]), 0.0) / wall
    return replace(co_location_of(samples["idle"], samples["busy"], threads, samples["decoding"]),
                   other_cpu_cores=other)


def co_location_of(idle: dict[StepShape, list[float]], busy: dict[StepShape, list[float]],
                   other_threads: int, decoding: dict[StepShape, list[float]] | None = None) -> CoLocation:
    """Per kind, the median over shapes timed in both conditions of median(busy) / median(idle);
    with ``decoding`` (A's steps while B decoded only), the same over decode shapes for
    :attr:`CoLocation.decode_beside_decode`."""
    ratios: dict[str, list[float]] = {k: [] for k in KINDS}
    counts = dict.fromkeys(KINDS, 0)
    for shape in idle.keys() & busy.keys():
        kind = step_kind(shape)
        ratios[kind].append(statistics.median(busy[shape]) / statistics.median(idle[shape]))
        counts[kind] += len(idle[shape]) + len(busy[shape])
    factors = {k: statistics.median(v) if v else 1.0 for k, v in ratios.items()}
    decoding = decoding or {}
    both = [shape for shape in decoding.keys() & idle.keys() if step_kind(shape) == "decode"]
    beside_decode = [statistics.median(decoding[shape]) / statistics.median(idle[shape]) for shape in both]
    if beside_decode:
        counts["decode_beside_decode"] = sum(len(decoding[shape]) + len(idle[shape]) for shape in both)
    return CoLocation(factors["prefill"], factors["decode"], other_threads, counts, METHOD,
                      decode_beside_decode=statistics.median(beside_decode) if beside_decode else None)


#: Fewer of a kind's served steps than this in either condition (the other worker busy, idle): no figure.
MIN_SERVED_STEPS = 5
#: Overlap with the other worker's steps (share of a step's time) above which a step counts as beside a
#: busy worker, and below which as beside an idle one; steps in between are not used.
BUSY_OVERLAP, IDLE_OVERLAP = 0.5, 0.05

SERVED_METHOD = ("the profile's hand-off probe (router + 1 prefill + 1 decode worker serving its requests, "
                 "every one handed off): each worker's steps from its step log, served / the fitted step "
                 "model, while the other worker was in a step for over half of it vs under 5 %; per kind "
                 "median(beside busy) / median(beside idle): prefill from the prefill worker's steps (beside "
                 "decoding), decode from the decode worker's (beside prefilling)")


def overlap_share(other: list[LoggedStep], t0: float, t1: float, starts: list[float]) -> float:
    """Share of [t0, t1) during which a step of ``other`` (sorted by start; ``starts``: their start
    times) ran."""
    i, covered = max(bisect.bisect_left(starts, t0) - 1, 0), 0.0
    while i < len(other) and other[i].t < t1:
        covered += max(0.0, min(other[i].t + other[i].s, t1) - max(other[i].t, t0))
        i += 1
    return covered / max(t1 - t0, 1e-9)


def _served_ratio(steps: list[LoggedStep], other: list[LoggedStep], kind: str, model: StepModel
                  ) -> tuple[float, int] | None:
    """median(served / model beside busy) / median(beside idle) of ``steps`` of ``kind``; None when either
    condition has fewer than :data:`MIN_SERVED_STEPS`."""
    starts = [o.t for o in other]
    busy, idle = [], []
    for step in steps:
        if step_kind(step.shape) != kind or step.s <= 0:
            continue
        predicted = model.step_time_s(step.shape)
        if predicted <= 0:
            continue
        share = overlap_share(other, step.t, step.t + step.s, starts)
        if share > BUSY_OVERLAP:
            busy.append(step.s / predicted)
        elif share < IDLE_OVERLAP:
            idle.append(step.s / predicted)
    if min(len(busy), len(idle)) < MIN_SERVED_STEPS:
        return None
    return statistics.median(busy) / statistics.median(idle), len(busy) + len(idle)


def served_co_location(prefill_steps: list[LoggedStep], decode_steps: list[LoggedStep], model: StepModel,
                       threads: int) -> CoLocation | None:
    """The slowdown measured on a served prefill + decode pair from their step logs (see
    :data:`SERVED_METHOD`). None when the prefill
    worker's prompt steps were too few beside a busy or an idle decode worker; the decode figure is 1.0
    (0 samples) when its steps were."""
    prefill = _served_ratio(prefill_steps, decode_steps, "prefill", model)
    if prefill is None:
        return None
    decode = _served_ratio(decode_steps, prefill_steps, "decode", model) or (1.0, 0)
    return CoLocation(prefill[0], decode[0], threads, {"prefill": prefill[1], "decode": decode[1]},
                      SERVED_METHOD)
