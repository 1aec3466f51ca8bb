"""Per-request sampling parameters, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.errors import InvalidRequestError

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """How one request picks its tokens and when it stops.

    Attributes:
        max_tokens: most tokens to generate (≥ 1).
        min_tokens: EOS and stop token ids are ignored until this many tokens exist.
        temperature: 0 means greedy; otherwise logits are divided by it.
        top_k: keep the k most likely tokens; 0 or -1 disables.
        top_p: keep the smallest set whose probability reaches top_p; 1 disables.
        min_p: drop tokens less likely than min_p × the top token's probability.
        seed: per-request seed. The same seed gives the same tokens whatever else
            is in the batch, and a request resumed from its tokens so far (migration)
            continues identically, because the noise for output token i depends
            only on (seed, i).
        stop: strings that end generation; the matched string is not returned.
        stop_token_ids: token ids that end generation (returned like EOS is not).
        ignore_eos: keep generating past EOS until max_tokens.
        logprobs: number of top log-probabilities to return per token (None = off).
            The sampled token's own log-probability is always included when set.
    """

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self._check()

    def _check(self) -> None:
        def bad(param: str, why: str) -> InvalidRequestError:
            value = getattr(self, param)
            return InvalidRequestError(f"{param}={value!r} is invalid: {why}", param=param)

        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "must be an integer ≥ 1")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer ≥ 0")
        if self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must not exceed max_tokens={self.max_tokens}")
        if not _is_number(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", "must be a number in [0, 100]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "must be an integer ≥ -1 (0 or -1 disables)")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be a number in (0, 1]")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be a number in [0, 1]")
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise bad("seed", "must be an integer that fits in 64 bits")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a list of non-empty strings")
        if len(self.stop) > 16:
            raise bad("stop", "at most 16 stop strings")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of non-negative integers")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}]")

    @property
    def greedy(self) -> bool:
        """True when the request takes the most likely token every step."""
        return self.temperature == 0.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value
