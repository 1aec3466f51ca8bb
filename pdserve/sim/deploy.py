"""Turn ``pdserve serve``-style options and bench workloads into the simulator's inputs.

- :func:`profile_pool` / :func:`paper_pool`: a :class:`PoolSpec` timed by a
  profile of this machine, or by the roofline of an accelerator;
- :func:`make_requests`: the bench's seeded requests (same workload, same
  arrivals, same seed → the same requests ``pdserve bench`` sends), their
  prompts tokenised the way the router does it when the model's tokenizer is
  at hand (presets, local checkpoints), else one id per word.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from pdserve.bench.arrivals import ArrivalConfig
from pdserve.bench.workload import RequestSpec, TokenCounter, make_counter
from pdserve.config import Role
from pdserve.errors import ConfigError
from pdserve.modelspec.arch import ArchConfig
from pdserve.sim.link import LinkModel
from pdserve.sim.profile import Profile
from pdserve.sim.roofline import RooflineStepModel
from pdserve.sim.simulator import PoolSpec, SimRequest

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def profile_num_blocks(arch: ArchConfig, dtype: str, block_size: int, kv_cache_bytes: int,
                       num_blocks: int | None) -> int:
    """KV blocks of a worker on this machine, sized the way the model runner sizes them."""
    if num_blocks:
        return num_blocks
    per_block = arch.kv_bytes_per_token(DTYPE_BYTES[dtype]) * block_size
    return max(kv_cache_bytes // per_block, 1)


def profile_pool(role: Role, count: int, profile: Profile, num_blocks: int, link: LinkModel | None
                 ) -> PoolSpec:
    """A pool of workers like the profiled one (no price: this machine), all on this host: a step
    slows down by the profile's co-location figure while another worker computes."""
    return PoolSpec(role, count, profile.pool_step_model(role), num_blocks, link=link,
                    co_location=profile.co_location,
                    label=f"this machine ({profile.machine.get('threads')} threads)")


def paper_pool(role: Role, count: int, model: RooflineStepModel, block_size: int,
               link: LinkModel | None = None, num_blocks: int | None = None) -> PoolSpec:
    """A pool of ``tp``-accelerator workers timed by the roofline."""
    return PoolSpec(role, count, model, num_blocks or model.num_kv_blocks(block_size), link=link,
                    num_gpus=model.tp, price_per_hour=model.price_per_hour(),
                    label=f"{model.accel.key}×{model.tp}")


@dataclass(frozen=True)
class PlannedRequest:
    """A bench request as the simulator takes it, or the error the server would answer."""

    request: SimRequest
    warmup: bool
    error: str | None = None


class PromptEncoder:
    """Prompt token ids as the router computes them (or one id per word without a tokenizer)."""

    def __init__(self, model: str, endpoint: str, vocab_size: int) -> None:
        from pdserve.tokenizer import Tokenizer, load_tokenizer

        self.endpoint = endpoint
        self.vocab_size = vocab_size
        self.tokenizer: Tokenizer | None
        try:
            self.tokenizer = load_tokenizer(model)
        except Exception:  # a model on paper: no tokenizer files here
            self.tokenizer = None

    def encode(self, spec: RequestSpec) -> tuple[int, ...]:
        """The prompt's token ids."""
        if self.tokenizer is not None:
            if self.endpoint == "chat":
                messages = [{"role": r, "content": c} for r, c in spec.messages]
                return tuple(self.tokenizer.encode_chat(messages))
            return tuple(self.tokenizer.encode(spec.prompt()))
        words = spec.prompt().split()
        # one id per word, stable across runs (crc32, not hash()), so shared prefixes stay shared
        return tuple(zlib.crc32(w.encode()) % (self.vocab_size - 3) + 3 for w in words) or (3,)


def workload_counter(tokenizer: str | None, encoder: PromptEncoder, model: str) -> TokenCounter:
    """How the workload counts prompt lengths: ``--tokenizer`` when given, else the model's own tokenizer
    when it has one here (so ``--input-len 1024`` is 1,024 of the tokens the router will compute), else
    one token per word (a model on paper)."""
    if tokenizer is None and encoder.tokenizer is not None:
        tokenizer = model
    return make_counter(tokenizer)


def make_requests(specs: Iterator[RequestSpec], arrivals: ArrivalConfig, encoder: PromptEncoder,
                  max_model_len: int, num_requests: int | None, duration_s: float | None,
                  warmup_requests: int = 0, warmup_s: float = 0.0) -> list[PlannedRequest]:
    """The run's requests in order: ``num_requests`` measured ones after the warm-up, or ``duration_s``."""
    if (num_requests is None) == (duration_s is None):
        raise ConfigError("give exactly one of --num-requests and --duration")
    if duration_s is not None and math.isinf(arrivals.rate):
        raise ConfigError("--duration with an infinite rate needs a finite --request-rate here")
    out: list[PlannedRequest] = []
    num_measured = 0
    for index, (spec, offset_s) in enumerate(zip(specs, arrivals.offsets_s(), strict=False)):
        if duration_s is not None and offset_s >= duration_s:
            break
        if num_requests is not None and num_measured >= num_requests:
            break
        warmup = index < warmup_requests or offset_s < warmup_s
        num_measured += not warmup
        ids = encoder.encode(spec)
        error = None
        if len(ids) >= max_model_len:
            error = f"the prompt has {len(ids)} tokens but max_model_len is {max_model_len}"
        out.append(PlannedRequest(SimRequest(offset_s, ids, spec.max_tokens), warmup, error))
    return out


def take(it: Iterator[RequestSpec], n: int) -> list[RequestSpec]:
    """The first ``n`` items."""
    return list(itertools.islice(it, n))
