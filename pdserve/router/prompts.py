"""Turning a request body into generation jobs, rejecting bad requests with a 400.

1. :func:`parse` validates the body strictly into a request model; the first
   error names the field it is about.
2. :meth:`Planner.num_choices` checks the model name (404) and ``n`` and
   counts the generations (prompts × ``n``) without tokenising, for admission.
3. :meth:`Planner.plan` (run in a worker thread: tokenising is CPU work)
   checks the model name, ``n`` and unsupported fields, builds the
   :class:`~pdserve.sampling_params.SamplingParams`, tokenises the prompts
   (chat: render the template, then encode without adding special tokens
   again), checks token ids and the context length, and returns a
   :class:`Plan` of one :class:`Choice` per prompt × sample.

Every failure is an :class:`~pdserve.router.errors.APIError` raised before the
backend sees anything.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, cast

from pydantic import ValidationError

from pdserve.errors import InvalidRequestError
from pdserve.router.backend import Backend
from pdserve.router.errors import APIError
from pdserve.router.openai_protocol import (
    FIELD_SHAPES,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
)
from pdserve.router.tracing import RequestTrace
from pdserve.sampling_params import MAX_LOGPROBS, SamplingParams
from pdserve.tokenizer import Tokenizer

MAX_N = 128
DEFAULT_COMPLETION_MAX_TOKENS = 16


@dataclass
class Choice:
    """One generation: a prompt × one of its ``n`` samples."""

    index: int
    sample_index: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    trace: RequestTrace | None = None  # set by the app once the request is planned


@dataclass
class Plan:
    """What a request became: its choices and how to answer them."""

    response_id: str
    created: int
    choices: list[Choice]
    num_prompt_tokens: int
    stream: bool
    include_usage: bool
    num_top_logprobs: int | None  # None: no logprobs asked for
    return_trace: bool = False  # answer with each choice's trace (``pdserve_trace``)


def parse(model: type[GenerationRequest], body: bytes) -> GenerationRequest:
    """The body as a ``model``; 400 naming the first bad field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        first = errors[0]
        if first["type"] == "json_invalid":
            raise APIError(400, f"the body is not valid JSON: {first['msg']}") from None
        if not first["loc"]:
            raise APIError(400, f"the body must be a JSON object: {first['msg']}") from None
        param = str(first["loc"][0])
        same_field = [err for err in errors if err["loc"] and err["loc"][0] == param]
        if len(same_field) > 1 and param in FIELD_SHAPES:  # matched no shape of a union
            message = f"'{param}' must be {FIELD_SHAPES[param]}"
        else:
            where = ".".join(str(p) for p in first["loc"])
            message = f"'{where}': {first['msg']}"
        raise APIError(400, message, param=param) from None


class Planner:
    """Validates and tokenises requests for one served model."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer, served_model_name: str) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.model = served_model_name

    def num_choices(self, req: GenerationRequest) -> int:
        """How many generations (prompts × ``n``) the request asks for; cheap, no tokenising.

        Checks the model name (404) and ``n`` (400) first.
        """
        if req.model is not None and req.model != self.model:
            raise APIError(
                404, f"The model `{req.model}` does not exist; this server serves `{self.model}`",
                param="model", code="model_not_found",
            )
        if not 1 <= req.n <= MAX_N:
            raise APIError(400, f"n={req.n} is invalid: must be in [1, {MAX_N}]", param="n")
        if isinstance(req, ChatCompletionRequest):
            return req.n
        prompt = cast(CompletionRequest, req).prompt
        single = isinstance(prompt, str) or (bool(prompt) and isinstance(prompt[0], int))
        return req.n * (1 if single else max(1, len(prompt)))

    def plan(self, req: GenerationRequest, response_id: str) -> Plan:
        """The request's choices; raises :class:`APIError` for an invalid request."""
        self.num_choices(req)
        _reject_unsupported(req)
        max_tokens_param = "max_tokens"
        max_tokens: int | None  # None: chat's default, the room the prompt leaves
        if isinstance(req, ChatCompletionRequest):
            if req.max_completion_tokens is not None:
                max_tokens, max_tokens_param = req.max_completion_tokens, "max_completion_tokens"
            else:
                max_tokens = req.max_tokens
            num_top = _chat_top_logprobs(req)
        else:
            req = cast(CompletionRequest, req)
            max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if req.max_tokens is None else req.max_tokens
            num_top = req.logprobs
        base = _params_or_400(req, max_tokens, num_top, max_tokens_param)
        prompts = self._prompts(req)
        choices: list[Choice] = []
        for prompt_index, ids in enumerate(prompts):
            num_tokens = self._check_context(len(ids), max_tokens, max_tokens_param)
            for j in range(req.n):
                index = prompt_index * req.n + j
                seed = None if base.seed is None else base.seed + j
                params = _replace_or_400(base, max_tokens_param, max_tokens=num_tokens, seed=seed)
                choices.append(Choice(index, j, f"{response_id}-{index}", ids, params))
        return Plan(
            response_id=response_id,
            created=int(time.time()),
            choices=choices,
            num_prompt_tokens=sum(len(ids) for ids in prompts),
            stream=req.stream,
            include_usage=req.stream and req.stream_options is not None and req.stream_options.include_usage,
            num_top_logprobs=num_top,
        )

    def _prompts(self, req: GenerationRequest) -> list[list[int]]:
        try:
            if isinstance(req, ChatCompletionRequest):
                if not req.messages:
                    raise APIError(400, "messages must not be empty", param="messages")
                messages = [m.model_dump(exclude_none=True) for m in req.messages]
                _check_roles(messages)
                ids = self.tokenizer.encode_chat(
                    messages, add_generation_prompt=True, chat_template_kwargs=req.chat_template_kwargs
                )
                return [self._check_ids(ids, "messages")]
            prompt = cast(CompletionRequest, req).prompt
            single = isinstance(prompt, str) or (bool(prompt) and isinstance(prompt[0], int))
            items: list[Any] = [prompt] if single else list(prompt)
            if not items or not all(items):
                raise APIError(400, "prompt must not be empty", param="prompt")
            return [
                self._check_ids(self.tokenizer.encode(p) if isinstance(p, str) else p, "prompt")
                for p in items
            ]
        except UnicodeEncodeError as e:
            raise APIError(400, f"the request holds text that is not valid Unicode: {e.reason}") from None

    def _check_ids(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise APIError(400, f"{param} must not be empty", param=param)
        vocab_size = self.tokenizer.vocab_size
        if min(ids) < 0 or max(ids) >= vocab_size:
            bad = next(t for t in ids if not 0 <= t < vocab_size)
            raise APIError(
                400, f"token id {bad} is outside the vocabulary [0, {vocab_size})", param=param
            )
        return ids

    def _check_context(self, num_prompt_tokens: int, max_tokens: int | None, param: str) -> int:
        """The number of tokens to generate; 400 when the prompt and it do not fit."""
        limit = self.backend.max_model_len
        if max_tokens is None:  # chat default: whatever room the prompt leaves
            if num_prompt_tokens >= limit:
                raise APIError(
                    400,
                    f"This model's maximum context length is {limit} tokens, and the prompt has "
                    f"{num_prompt_tokens} tokens, which leaves no room for a completion. "
                    "Please shorten the messages.",
                    param="messages", code="context_length_exceeded",
                )
            return limit - num_prompt_tokens
        if num_prompt_tokens + max_tokens > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, "
                f"{max_tokens} for the completion). Please reduce the prompt or {param}.",
                param=param, code="context_length_exceeded",
            )
        return max_tokens


def _reject_unsupported(req: GenerationRequest) -> None:
    unsupported = {
        "best_of": req.best_of not in (None, req.n),
        "presence_penalty": bool(req.presence_penalty),
        "frequency_penalty": bool(req.frequency_penalty),
        "repetition_penalty": req.repetition_penalty not in (None, 1.0),
        "logit_bias": bool(req.logit_bias),
    }
    if isinstance(req, CompletionRequest):
        unsupported |= {"echo": req.echo, "suffix": bool(req.suffix)}
    elif isinstance(req, ChatCompletionRequest):
        response_type = (req.response_format or {}).get("type", "text")
        unsupported |= {"response_format": response_type != "text", "tools": bool(req.tools)}
    for param, bad in unsupported.items():
        if bad:
            raise APIError(400, f"'{param}' is not supported by this server; leave it unset", param=param)


def _chat_top_logprobs(req: ChatCompletionRequest) -> int | None:
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise APIError(
                400, f"top_logprobs={req.top_logprobs} is invalid: must be in [0, {MAX_LOGPROBS}]",
                param="top_logprobs",
            )
    return (req.top_logprobs or 0) if req.logprobs else None


def _params_or_400(
    req: GenerationRequest, max_tokens: int | None, logprobs: int | None, max_tokens_param: str
) -> SamplingParams:
    stop = req.stop if isinstance(req.stop, list) else [] if req.stop is None else [req.stop]
    try:
        return SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else 1 + (req.min_tokens or 0),
            min_tokens=req.min_tokens or 0,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=0 if req.top_k is None else req.top_k,
            top_p=1.0 if req.top_p is None else req.top_p,
            min_p=0.0 if req.min_p is None else req.min_p,
            seed=req.seed,
            stop=stop,
            stop_token_ids=req.stop_token_ids or [],
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
        )
    except InvalidRequestError as e:
        raise _renamed(e, max_tokens_param) from None


def _replace_or_400(base: SamplingParams, max_tokens_param: str, **changes: Any) -> SamplingParams:
    try:
        return dataclasses.replace(base, **changes)
    except InvalidRequestError as e:
        raise _renamed(e, max_tokens_param) from None


def _renamed(e: InvalidRequestError, max_tokens_param: str) -> APIError:
    """The error, naming the request's own field when chat sent ``max_completion_tokens``."""
    message, param = str(e), e.param
    if param == "max_tokens" and max_tokens_param != "max_tokens":
        message, param = message.replace("max_tokens", max_tokens_param, 1), max_tokens_param
    return APIError(400, message, param=param)


#: Chat roles the OpenAI API defines.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def _check_roles(messages: list[dict[str, Any]]) -> None:
    """400 naming the first message whose role the API does not define."""
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise APIError(
                400,
                f"messages[{i}].role is {role!r}; it must be one of {', '.join(CHAT_ROLES)}",
                param="messages",
            )
