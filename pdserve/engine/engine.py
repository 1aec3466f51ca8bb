"""The engine: a model runner, a block manager and a scheduler, stepped together.

One ``step()``: schedule → execute → update → turn new tokens into outputs
(text, stop strings). Used directly by workers of every role and, through
:class:`pdserve.LLM`, offline.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from pdserve.config import ConfigError, EngineConfig, Role
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.model_runner import KVAllocator, ModelRunner
from pdserve.engine.scheduler import Scheduler, SchedulerOutput
from pdserve.errors import InvalidRequestError
from pdserve.model.llama import LlamaForCausalLM
from pdserve.model.smooth import CALIBRATION_TEXT
from pdserve.modelspec.arch import ArchConfig, load_arch_config
from pdserve.request import Request, RequestStatus, TokenLogprobs
from pdserve.sampling_params import SamplingParams
from pdserve.tokenizer import Tokenizer, load_tokenizer
from pdserve.tokenizer.detokenizer import Detokenizer

logger = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    """What a request produced so far; ``new_*`` fields hold this step's part."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_cached_tokens: int = 0


class StepHooks(Protocol):
    """Observers of one step, used by workers to stream KV while it is computed."""

    def on_schedule(self, out: SchedulerOutput) -> None:
        """Called with the batch before the model runs."""

    def on_layer_done(self, layer: int) -> None:
        """Called as soon as a layer has written this step's K/V into the cache."""


def resolve_max_model_len(config: EngineConfig, arch: ArchConfig) -> int:
    """The context limit: the configured one, capped by the model's positions."""
    limit = arch.max_position_embeddings
    wanted = config.model.max_model_len
    if wanted is None:
        return limit
    if wanted > limit:
        raise InvalidRequestError(
            f"max_model_len={wanted} exceeds the model's max_position_embeddings={limit}"
        )
    return wanted


def cap_to_kv_capacity(max_model_len: int, explicit: bool, num_blocks: int, block_size: int) -> int:
    """The context limit, no longer than the KV cache holds.

    A request longer than the whole cache would wait for blocks forever, and
    hold up every request queued behind it. An explicit ``--max-model-len``
    the cache cannot hold is a configuration error; the model's own limit is
    lowered to the cache's capacity, with a warning.
    """
    capacity = num_blocks * block_size
    if max_model_len <= capacity:
        return max_model_len
    if explicit:
        raise ConfigError(
            f"max_model_len={max_model_len} does not fit the KV cache: it holds {capacity} tokens "
            f"({num_blocks} blocks of {block_size}); give the cache more memory or lower max_model_len"
        )
    logger.warning("the KV cache holds %d tokens (%d blocks of %d): max_model_len lowered from %d to %d",
                   capacity, num_blocks, block_size, max_model_len, capacity)
    return capacity


class LLMEngine:
    """Single-process engine for one role (mixed, prefill or decode).

    Args:
        config: model, cache and scheduler settings.
        kv_allocator: allocates the KV tensors (a decode worker places them where
            its KV receiver can write); default: plain tensors on the device.
        detokenize: turn tokens into text and apply stop strings here. Workers
            turn it off: the router owns text and stop strings.
        model: weights already loaded for this model (a worker changing role
            keeps its own); default: load them.
        record_kv_events: the block manager records prefix-cache events (workers
            publish them to the router's cache index).
    """

    def __init__(
        self,
        config: EngineConfig,
        kv_allocator: KVAllocator | None = None,
        detokenize: bool = True,
        model: LlamaForCausalLM | None = None,
        record_kv_events: bool = False,
    ) -> None:
        self.config = config
        self.detokenize = detokenize
        self.arch = load_arch_config(config.model.model)
        self.tokenizer: Tokenizer = load_tokenizer(config.model.model)
        self.max_model_len = resolve_max_model_len(config, self.arch)
        self.eos_token_ids = tuple(sorted(set(self.arch.eos_token_ids) | set(self.tokenizer.eos_token_ids)))
        calibration = None  # text whose activations set int8's smoothing scales
        if config.model.quantization != "none" and model is None:
            calibration = self.tokenizer.encode(CALIBRATION_TEXT)
        self.runner = ModelRunner(config.model, config.cache, self.arch, kv_allocator, model, calibration)
        self.max_model_len = cap_to_kv_capacity(self.max_model_len, config.model.max_model_len is not None,
                                                self.runner.num_blocks, config.cache.block_size)
        self.block_manager = BlockManager(
            self.runner.num_blocks,
            config.cache.block_size,
            config.cache.enable_prefix_caching,
            record_events=record_kv_events,
        )
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.max_model_len)
        self._detokenizers: dict[str, Detokenizer] = {}
        self._ids = itertools.count()
        self.num_prompt_tokens_computed = 0
        self.num_steps = 0
        # Step timings by kind, for the router's cost model (prefill rate, decode step time).
        self.prefill_busy_s = 0.0
        self.num_prefill_steps = 0
        self.num_decode_steps = 0
        self.decode_busy_s = 0.0
        self.num_decode_seqs = 0

    @property
    def role(self) -> Role:
        """This engine's role."""
        return self.config.scheduler.role

    # -- requests ----------------------------------------------------------------

    def make_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        output_token_ids: list[int] | None = None,
    ) -> Request:
        """Validate and tokenise a prompt into a :class:`Request` (not yet queued)."""
        if isinstance(prompt, str):
            prompt_ids = self.tokenizer.encode(prompt)
        else:
            prompt_ids = list(prompt)
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        vocab = self.arch.vocab_size
        bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(
                f"prompt token id {bad[0]!r} is outside the vocabulary [0, {vocab})", param="prompt"
            )
        num_tokens = len(prompt_ids) + len(output_token_ids or [])
        if num_tokens >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {num_tokens} tokens but max_model_len is {self.max_model_len}: "
                f"it must be shorter to leave room for at least one generated token",
                param="prompt",
            )
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        return Request(
            rid, prompt_ids, params, self.eos_token_ids, output_token_ids=list(output_token_ids or [])
        )

    def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> Request:
        """Validate, tokenise and queue a request for prefill here."""
        request = self.make_request(prompt, params, request_id)
        self.enqueue(request)
        return request

    def enqueue(self, request: Request, gated: bool = False) -> None:
        """Queue a request built by :meth:`make_request` for prefill here (``gated``: see
        :meth:`Scheduler.add_request`)."""
        self.scheduler.add_request(request, gated=gated)
        self._track(request)

    def add_remote_request(self, request: Request) -> list[int] | None:
        """Decode or mixed role: reserve blocks for a request whose KV arrives from another worker."""
        block_ids = self.scheduler.add_remote_request(request)
        if block_ids is not None:
            self._track(request)
        return block_ids

    def finish_remote_kv(
        self, request_id: str, first_token_id: int, logprobs: TokenLogprobs | None = None
    ) -> RequestOutput:
        """Decode or mixed role: KV and first token are in; the request joins the batch."""
        request = self.scheduler.finish_remote_kv(request_id, first_token_id, logprobs)
        return self._output(request, [first_token_id])

    def _track(self, request: Request) -> None:
        if self.detokenize:
            self._detokenizers[request.request_id] = Detokenizer(self.tokenizer, request.sampling_params.stop)

    def abort_request(self, request_id: str) -> None:
        """Abort a request wherever it is and free its KV."""
        self.scheduler.abort(request_id)
        self._detokenizers.pop(request_id, None)

    def release(self, request_id: str) -> None:
        """Prefill or mixed role: free the KV held for a hand-off."""
        self.scheduler.release(request_id)

    def has_unfinished_requests(self) -> bool:
        """True while any request needs more steps."""
        return self.scheduler.has_unfinished_requests()

    # -- step --------------------------------------------------------------------

    def step(self, hooks: StepHooks | None = None) -> list[RequestOutput]:
        """Run one step; returns outputs of requests that produced tokens or finished."""
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        if hooks is not None:
            hooks.on_schedule(out)
        self.num_steps += 1
        num_prompt = out.num_prompt_tokens
        self.num_prompt_tokens_computed += num_prompt
        started_s = time.perf_counter()
        sampled = self.runner.execute(out, hooks.on_layer_done if hooks is not None else None)
        elapsed_s = time.perf_counter() - started_s
        if num_prompt:
            self.prefill_busy_s += elapsed_s
            self.num_prefill_steps += 1
        else:
            self.num_decode_steps += 1
            self.decode_busy_s += elapsed_s
            self.num_decode_seqs += len(out.scheduled)
        changed = self.scheduler.update(out, sampled)
        return [self._output(r, r.output_token_ids[-1:]) for r in changed]

    def _output(self, request: Request, new_ids: list[int]) -> RequestOutput:
        detok = self._detokenizers.get(request.request_id)
        new_text = ""
        text = ""
        if detok is not None:
            detok.add_tokens(new_ids)
            if detok.stop_reason is not None and not request.finished:
                self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)
                request.stop_reason = detok.stop_reason
            new_text = detok.take_delta(request.finished)
            text = detok.text
            if request.finished:
                del self._detokenizers[request.request_id]
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=request.output_token_ids,
            text=text,
            new_token_ids=list(new_ids),
            new_text=new_text,
            finished=request.finished,
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
            logprobs=request.output_logprobs,
            num_cached_tokens=request.num_cached_tokens,
        )
