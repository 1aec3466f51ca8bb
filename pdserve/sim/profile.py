"""``pdserve profile``: time this machine's engine steps and KV links, fit the simulator's models.

1. Build the real engine (:class:`LLMEngine`) for the model with the given
   engine options and thread count; warm it up.
2. Run fixed scenarios through it, timing every ``step()`` and recording its
   shape (:func:`step_shape` of the real scheduler's batch): single prompts
   of several lengths (whole and in chunks, so chunks see earlier context),
   decode batches of several sizes and contexts, and mixed steps (a prompt
   joining running decodes). Steps of the same shape keep their median time.
3. Fit :class:`LinearStepModel` to them (:func:`fit_linear`) and report its
   error on the samples.
4. For each KV transport (``shm``, ``tcp``) push requests' KV of several
   sizes to a receiver in another process: the seconds for a notice alone
   (latency) and the slope over the bytes (bandwidth) make a
   :class:`LinkModel`.
5. Unless ``--no-serving``: serve a few requests through a real router and
   worker and record what they cost beyond their steps
   (:mod:`pdserve.sim.serving`).
6. Unless ``--no-co-location``: the steps' slowdown while another engine on
   the host computes (:mod:`pdserve.sim.colocation`).
7. Write it all with the model's and the machine's identity; :func:`load_profile`
   refuses a profile of another model and warns about another machine (and
   about an older profile without the later terms: those are 0, and no
   co-location figure is a slowdown of 1.0).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pdserve.config import EngineConfig, Role
from pdserve.errors import ConfigError
from pdserve.sim.colocation import CoLocation
from pdserve.sim.link import LinkModel
from pdserve.sim.serving import ServingOverhead, apply_serving
from pdserve.sim.step_model import LinearStepModel, ShapeHooks, StepModel, StepShape, missing_later_features

logger = logging.getLogger(__name__)

FORMAT = "pdserve-profile/1"


def machine_identity(threads: int) -> dict[str, Any]:
    """What the step times depend on besides the model: CPU (or GPU), core count, threads, torch."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "gpu": gpu, "threads": threads,
            "torch": torch.__version__, "hostname": platform.node()}


def measure_steps(config: EngineConfig, quick: bool, progress: Callable[[str], None] = lambda s: None,
                  rounds: dict[StepShape, list[float]] | None = None) -> tuple[list[StepShape], list[float]]:
    """Time the real engine's steps over the profile's scenarios; (shape, median seconds) pairs.
    ``rounds`` (when given) receives every timing of each shape in order: the first is the first time
    the engine met that shape (a cost of new shapes would show there, not in the median)."""
    from pdserve.engine.engine import LLMEngine
    from pdserve.sampling_params import SamplingParams

    # Prefix caching on: a decode batch shares one cached prompt, so its context costs no prefill time
    # here (the step model depends on computed tokens and context, not on which blocks hold them).
    config = replace(config, cache=replace(config.cache, enable_prefix_caching=True))
    engine = LLMEngine(config, detokenize=False)
    vocab = engine.arch.vocab_size
    limit = engine.max_model_len
    rng = random.Random(0)
    timer = ShapeHooks()
    samples: dict[StepShape, list[float]] = {}

    def prompt(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(min(n, limit - 64))]

    def run(prompts: list[int], max_tokens: int, join_after: int = 0, join_len: int = 0,
            shared: bool = False) -> None:
        ids = prompt(prompts[0]) if shared else None
        if ids is not None:  # cache the shared prompt first (its steps are timed too)
            run_ids([ids], 1)
        run_ids([ids or prompt(n) for n in prompts], max_tokens, join_after, join_len)

    def run_ids(prompts: list[list[int]], max_tokens: int, join_after: int = 0, join_len: int = 0) -> None:
        for ids in prompts:
            engine.add_request(ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        step = 0
        while engine.has_unfinished_requests():
            if join_len and step == join_after:
                engine.add_request(prompt(join_len), SamplingParams(max_tokens=2, ignore_eos=True))
            t0 = time.perf_counter()
            engine.step(hooks=timer)
            dt = time.perf_counter() - t0
            if timer.shape is not None:
                samples.setdefault(timer.shape, []).append(dt)
                timer.shape = None
            step += 1

    run([16, 64], 4)  # warm-up, not kept
    samples.clear()
    repeats = 3
    prefill_lens = [32, 128, 512, 1024] if quick else [16, 32, 64, 128, 256, 512, 1024, 2048]
    decode_batches = [1, 2, 4, 16] if quick else [1, 2, 4, 8, 16, 32, 64]
    contexts = [64, 512] if quick else [32, 256, 1024]
    for rep in range(repeats):
        progress(f"round {rep + 1}/{repeats}: prompts")
        for n in prefill_lens:
            run([n], 1)
        progress(f"round {rep + 1}/{repeats}: decode batches")
        for b in decode_batches:
            for c in contexts:
                run([c] * b, 6, shared=True)
        progress(f"round {rep + 1}/{repeats}: mixed steps")
        for b in decode_batches[1:]:  # a prompt of a few chunks joins b running decodes
            run([64] * b, 12, join_after=2, join_len=2 * config.scheduler.chunk_size)
    shapes = list(samples)
    if rounds is not None:
        rounds.update(samples)
    return shapes, [statistics.median(samples[s]) for s in shapes]


def _receiver_main(transport: str, layout: Any, conn: Any) -> None:
    import torch

    from pdserve.transfer import make_receiver

    torch.set_num_threads(1)
    receiver = make_receiver(transport, layout)
    conn.send(receiver.descriptor())
    while not conn.poll():
        for d in receiver.poll(timeout_s=0.01):
            conn.send((time.monotonic(), d.num_bytes, d.error))
    receiver.close()


def measure_link(transport: str, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: str, sizes_tokens: tuple[int, ...] = (0, 256, 1024, 4096), reps: int = 3
                 ) -> LinkModel:
    """Latency (a notice alone) and bandwidth (slope over bytes) of one transport, to another process."""
    import torch

    from pdserve.transfer import KVLayout, make_sender

    num_blocks = -(-max(sizes_tokens) // block_size) + 1
    layout = KVLayout(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype)
    src = [tuple(torch.zeros((num_blocks, *layout.block_shape), dtype=layout.torch_dtype) for _ in range(2))
           for _ in range(num_layers)]
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver_main, args=(transport, layout, child), daemon=True)
    proc.start()
    sender = make_sender(src, override=transport)  # type: ignore[arg-type]
    points: list[tuple[int, float]] = []
    try:
        sender.connect("d", parent.recv())
        for rep in range(reps + 1):
            for tokens in sizes_tokens:
                ids = list(range(-(-tokens // block_size)))
                rid = f"{rep}-{tokens}"
                t0 = time.monotonic()
                for layer in range(num_layers if ids else 0):
                    sender.send_blocks("d", rid, layer, ids, ids)
                sender.send_done("d", rid, b"")
                seen_s, num_bytes, error = parent.recv()
                if error is not None:
                    raise RuntimeError(f"{transport} transfer failed: {error}")
                if rep:  # the first round warms up
                    points.append((num_bytes, seen_s - t0))
    finally:
        sender.close()
        parent.send("stop")
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    latency_s = statistics.median(t for b, t in points if b == 0)
    big = [(b, t) for b, t in points if b > 0]
    slopes = [(t - latency_s) / b for b, t in big if t > latency_s]
    per_byte = statistics.median(slopes) if slopes else 1e-12
    return LinkModel(1.0 / per_byte, latency_s)


@dataclass
class Profile:
    """A profile: model, machine, engine settings, the fitted step model and the links."""

    model: str
    arch: dict[str, Any]
    machine: dict[str, Any]
    engine: dict[str, Any]
    step_model: LinearStepModel
    fit: dict[str, Any]
    links: dict[str, LinkModel]
    samples: list[dict[str, Any]]
    serving: ServingOverhead | None = None
    serving_handoff: ServingOverhead | None = None
    co_located: CoLocation | None = None  # None: not measured (an older profile)
    co_located_served: CoLocation | None = None  # measured on the served hand-off probe (None: not)

    @property
    def co_location(self) -> CoLocation:
        """The measured co-location slowdown; none (1.0) when the profile did not measure it. The
        prefill factor is the served probe's when it was measured (see :mod:`pdserve.sim.colocation`),
        the decode factor the engine pair's."""
        base = self.co_located if self.co_located is not None else CoLocation()
        if self.co_located_served is None:
            return base
        return replace(base, prefill=self.co_located_served.prefill,
                       method=f"{base.method or 'not measured'}; prefill: {self.co_located_served.method}")

    @property
    def sim_step_model(self) -> StepModel:
        """What a simulated worker's step takes: the fitted model plus the per-token serving overhead."""
        return apply_serving(self.step_model, self.serving)

    def pool_step_model(self, role: Role) -> StepModel:
        """:attr:`sim_step_model`; on a decode worker with the hand-offs' per-token overhead (if measured)."""
        if role is Role.DECODE and self.serving_handoff is not None:
            return apply_serving(self.step_model, self.serving_handoff)
        return self.sim_step_model

    @property
    def request_overhead_s(self) -> float | None:
        """The measured cost before a request's first token (None: not measured): the one measured
        with requests arriving while others are served when the profile has it, else the idle one."""
        return self.serving.per_request_s if self.serving is not None else None

    @property
    def handoff_overhead_s(self) -> float:
        """What a handed-off request's first token costs beyond a local one's (0: not measured)."""
        if self.serving_handoff is None:
            return 0.0
        return max(self.serving_handoff.per_request_s - (self.request_overhead_s or 0.0), 0.0)

    def to_json(self) -> dict[str, Any]:
        """The profile file's content."""
        return {
            "format": FORMAT, "model": self.model, "arch": self.arch, "machine": self.machine,
            "engine": self.engine,
            "step_model": {"form": "t = const + tokens·a + prefill_pairs·b + decode_context·c + sampled·d"
                                   " + multi_row·e (multi_row: 1 when the step computes > 1 token;"
                                   " decode_context: decoding rows × the longest context, the keys the"
                                   " padded decode attention reads)",
                           "coefficients_s": self.step_model.to_json(), **self.fit},
            "links": {k: {"bandwidth_bytes_per_s": v.bandwidth_bytes_per_s, "latency_s": v.latency_s}
                      for k, v in self.links.items()},
            **({"serving_overhead": self.serving.to_json()} if self.serving is not None else {}),
            **({"serving_overhead_handoff": self.serving_handoff.to_json()}
               if self.serving_handoff is not None else {}),
            **({"co_located": self.co_located.to_json()} if self.co_located is not None else {}),
            **({"co_located_served": self.co_located_served.to_json()}
               if self.co_located_served is not None else {}),
            "samples": self.samples,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Profile:
        """Inverse of :meth:`to_json`; a file of another format is refused."""
        if data.get("format") != FORMAT:
            raise ConfigError(f"not a pdserve profile (format {data.get('format')!r}, expected {FORMAT!r})")
        sm = data["step_model"]
        return cls(
            model=data["model"], arch=data["arch"], machine=data["machine"], engine=data["engine"],
            step_model=LinearStepModel.from_json(sm["coefficients_s"]),
            fit={k: v for k, v in sm.items() if k not in ("coefficients_s", "form")},
            links={k: LinkModel(v["bandwidth_bytes_per_s"], v["latency_s"])
                   for k, v in data["links"].items()},
            samples=data.get("samples", []),
            serving=(ServingOverhead.from_json(data["serving_overhead"])
                     if "serving_overhead" in data else None),
            serving_handoff=(ServingOverhead.from_json(data["serving_overhead_handoff"])
                             if "serving_overhead_handoff" in data else None),
            co_located=CoLocation.from_json(data["co_located"]) if "co_located" in data else None,
            co_located_served=(CoLocation.from_json(data["co_located_served"])
                               if "co_located_served" in data else None),
        )

    def link(self, transport: str | None = None) -> LinkModel:
        """The link of ``transport`` (default: shm when measured, the slowest otherwise)."""
        if transport is None:
            transport = "shm" if "shm" in self.links else min(
                self.links, key=lambda k: self.links[k].bandwidth_bytes_per_s, default="")
        if transport not in self.links:
            known = ", ".join(self.links) or "none"
            raise ConfigError(f"the profile has no {transport!r} link; it has {known}")
        return self.links[transport]


def load_profile(path: str | Path, model: str, threads: int | None = None,
                 warn: Callable[[str], None] = logger.warning) -> Profile:
    """Read a profile for ``model``: another model's is refused, another machine's warned about."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read profile {path}: {exc}") from exc
    try:
        profile = Profile.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"profile {path} is malformed: {exc}") from exc
    missing = missing_later_features(data["step_model"]["coefficients_s"])
    if missing:
        warn(f"profile {path} is older than the step model's {', '.join(missing)} term: taken as 0 "
             f"(rerun `pdserve profile` for the current form)")
    if profile.serving is None:
        warn(f"profile {path} has no serving overhead (HTTP, router, per-token streaming): simulated as 0 "
             f"beyond --request-overhead-ms (rerun `pdserve profile` without --no-serving to measure it)")
    elif profile.serving.first_token_loaded_s is None:
        warn(f"profile {path} is older than the loaded serving overhead (requests arriving while others "
             f"are served): its idle figure is used before each first token (rerun `pdserve profile`)")
    elif not profile.serving.loaded_usable:
        warn(f"profile {path} has a loaded serving overhead of the median over every loaded request, which "
             f"the probe's own queueing biases: not used, its idle figure is used before each first token "
             f"(rerun `pdserve profile` for the figure of requests that waited behind none)")
    if profile.co_located is None:
        warn(f"profile {path} has no co-location figure (steps while another worker on the host computes): "
             f"simulated as no slowdown (rerun `pdserve profile` to measure it)")
    if profile.model != model:
        raise ConfigError(f"profile {path} was taken with model {profile.model!r}, not {model!r}: "
                          f"run `pdserve profile --model {model}`")
    here = machine_identity(threads if threads is not None else profile.machine.get("threads", 0))
    for key in ("cpu", "cpu_count", "gpu", "threads"):
        if profile.machine.get(key) != here[key]:
            warn(f"profile {path} was taken with {key}={profile.machine.get(key)!r}, here it is "
                 f"{here[key]!r}: simulated times may not match this machine")
    return profile
