"""The offline API: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine.engine import LLMEngine, RequestOutput
from pdserve.errors import ConfigError
from pdserve.sampling_params import SamplingParams

_SECTIONS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig}


def make_engine_config(model: str = "tiny", **options: Any) -> EngineConfig:
    """Build an :class:`EngineConfig` from flat options named after config fields.

    ``make_engine_config("tiny", block_size=32, chunk_size=256)`` sets
    ``cache.block_size`` and ``scheduler.chunk_size``; an unknown name raises
    :class:`ConfigError` listing the accepted ones.
    """
    parts: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    parts["model"]["model"] = model
    owners = {f.name: section for section, cls in _SECTIONS.items() for f in dataclasses.fields(cls)}
    for key, value in options.items():
        if key not in owners or key == "model":
            known = ", ".join(sorted(k for k in owners if k != "model"))
            raise ConfigError(f"unknown engine option {key!r}; known options: {known}")
        parts[owners[key]][key] = value
    return EngineConfig(
        model=ModelConfig(**parts["model"]),
        cache=CacheConfig(**parts["cache"]),
        scheduler=SchedulerConfig(**parts["scheduler"]),
    )


class LLM:
    """Generate text offline with continuous batching.

    Args:
        model: preset name (``tiny``, ``bench-50m``), alias (``smollm2-135m``), GGUF file
            or Hugging Face checkpoint directory (see docs/models.md).
        config: a complete :class:`EngineConfig` (then ``options`` must be empty).
        **options: engine options by field name, see :func:`make_engine_config`.
    """

    def __init__(self, model: str = "tiny", config: EngineConfig | None = None, **options: Any) -> None:
        if config is not None and options:
            raise ConfigError("pass either config or options, not both")
        self.engine = LLMEngine(config or make_engine_config(model, **options))
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in prompt order."""
        prompt_list: list[str | list[int]] = [prompts] if isinstance(prompts, str) else list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = (
            [sampling_params] * len(prompt_list)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params_list) != len(prompt_list):
            raise ConfigError(f"{len(prompt_list)} prompts but {len(params_list)} sampling params")
        engine = self.engine
        # Validate everything before queueing anything, so a bad prompt leaves no work behind.
        requests = [engine.make_request(p, sp) for p, sp in zip(prompt_list, params_list, strict=True)]
        for request in requests:
            engine.enqueue(request)
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(requests), desc="generate", unit="req", disable=not use_tqdm)
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        results[output.request_id] = output
                        bar.update(1)
        except BaseException:
            for request in requests:
                engine.abort_request(request.request_id)
            raise
        finally:
            bar.close()
        return [results[r.request_id] for r in requests]

    def chat(
        self,
        messages: list[dict[str, str]],
        sampling_params: SamplingParams | None = None,
    ) -> RequestOutput:
        """Generate the assistant's reply to a chat (the model's chat template applies)."""
        ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        return self.generate([ids], sampling_params)[0]
