"""Turns one step's logits into one token per request.

Pipeline, vectorised over the batch (one row per request that samples this step)
with per-row parameter tensors:

1. ``min_tokens``: while fewer than ``min_tokens`` tokens exist, the request's EOS
   and ``stop_token_ids`` get ``-inf``. ``ignore_eos`` does not mask: it only
   changes when the engine stops.
2. Rows are grouped by kind, and each group is sampled as one batch:
   *greedy* rows (``temperature == 0``) take the argmax; *full* rows (no top_k,
   no top_p) build the cumulative sum of ``exp((x - max) / T)`` over the whole
   vocabulary, with ``min_p`` zeroing the tokens less likely than ``min_p`` × the
   top one; *top_k* and *top_p* rows take their largest logits (the top k, or a
   window that holds the nucleus), scale them by ``1 / T``, keep the top_k
   prefix, then the smallest prefix whose renormalised mass reaches ``top_p``,
   then the min_p prefix, and build the cumulative sum over what is kept.
3. Each random row draws one token by inverse-CDF: the first cumulative weight
   above ``u × total`` for one uniform ``u`` per row.
4. Log-probabilities, for rows that asked, come from ``log_softmax`` of the raw
   logits: before temperature, filters and the min_tokens mask. That is the
   model's own distribution, and what vLLM returns by default.

Reproducibility: a seeded row's ``u`` is a splitmix64 hash of ``(seed, k)``, with
``k`` the index of the token being sampled, computed with Python integers. The
token then depends only on the row's logits, parameters, seed and ``k``: not on
the batch or the row order, so a request resumed on another worker from its
tokens so far continues identically (across device types the noise is the same
too; only float rounding of the logits can differ). Rows without a seed draw
``u`` from the sampler's own generator; greedy rows draw nothing.

Why one uniform per row rather than Gumbel / exponential-race noise per token: on
CPU, exponential noise for 64 × 32000 logits costs ~40 ms, the cumulative sum
~1 ms. Both are exact up to float32 rounding: here ``u`` has 24 bits and each
token's probability is honoured to about 2**-24 absolute.

On CPU a full sort costs 1-2 ms per 32k-vocabulary row, so a top_p row without
top_k first looks for its nucleus among its 512 largest logits, then 4096, and
sorts only when the nucleus is wider still. On a GPU it sorts at once: each retry
would cost a device sync.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.request import Request, TokenLogprobs
from pdserve.sampling_params import SamplingParams

# Below this temperature, logits / temperature could overflow float32.
_MIN_TEMPERATURE = 1e-6
_TOP_P_WINDOWS_TOKENS = (512, 4096)
_UNIFORM_BITS = 24  # float32 holds these exactly, so u < 1 always
# Full rows without min_p act as min_p = 2**-100: those tokens could never be drawn
# with a 24-bit u anyway, and the scaled weights stay finite (≤ 2**100 × vocab).
_MIN_MIN_P = 2.0**-100
_BELOW_ONE = 1.0 - 2.0**-24  # largest float32 below 1: ``w > _BELOW_ONE`` ⇔ ``w ≥ 1``
_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15


@dataclass
class SampledToken:
    """One sampled token and, when its request asked, its log-probabilities."""

    token_id: int
    logprobs: TokenLogprobs | None = None


class Sampler:
    """Samples one token per row of a logits batch; see the module docstring."""

    def __init__(self, seed: int = 0) -> None:
        """``seed`` seeds the generator used by requests without their own seed."""
        self._rng = random.Random(seed)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> list[SampledToken]:
        """Sample a token for each request; ``logits`` is [N, V], row i for ``requests[i]``."""
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(
                f"logits must be [num_requests={len(requests)}, vocab], got {tuple(logits.shape)}"
            )
        if not requests:
            return []
        params = [r.sampling_params for r in requests]
        token_ids = self._sample(_mask_min_tokens(logits, requests), requests)  # [N]

        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not logprob_rows:  # the common path: one device sync
            return [SampledToken(t) for t in token_ids.tolist()]
        logprobs = _logprobs(logits, token_ids, logprob_rows, params)
        results = [SampledToken(t) for t in token_ids.tolist()]
        for i, lp in zip(logprob_rows, logprobs, strict=True):
            results[i].logprobs = lp
        return results

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """One token per row of ``logits`` [N, V], each kind of row in one batch; returns [N]."""
        vocab = logits.shape[1]
        uniforms = [self._uniform(r) for r in requests]
        groups: dict[_RowKind, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(_row_kind(r.sampling_params, vocab), []).append(i)
        if len(groups) == 1:
            [kind] = groups
            return _sample_rows(kind, logits, [r.sampling_params for r in requests], uniforms)
        token_ids = torch.empty(len(requests), dtype=torch.long, device=logits.device)  # [N]
        for kind, rows in groups.items():
            index = _index(rows, logits.device)
            sampled = _sample_rows(
                kind,
                logits.index_select(0, index),
                [requests[i].sampling_params for i in rows],
                [uniforms[i] for i in rows],
            )
            token_ids.index_copy_(0, index, sampled)
        return token_ids

    def _uniform(self, request: Request) -> float:
        """The uniform in [0, 1) that picks this request's next token (0 when greedy)."""
        seed = request.sampling_params.seed
        if request.sampling_params.greedy:
            return 0.0
        if seed is None:
            return self._rng.getrandbits(_UNIFORM_BITS) / (1 << _UNIFORM_BITS)
        return seeded_uniform(seed, request.num_output_tokens)


def seeded_uniform(seed: int, k: int) -> float:
    """A uniform in [0, 1) with 24 bits that depends only on ``(seed, k)``.

    Seeds are taken modulo 2**64, so -1 and 2**64 - 1 are the same seed.
    """
    z = _mix64((_mix64(seed & _MASK64) + (k + 1) * _GOLDEN64) & _MASK64)
    return (z >> (64 - _UNIFORM_BITS)) / (1 << _UNIFORM_BITS)


def _mix64(z: int) -> int:
    """The splitmix64 finaliser: a bijection on 64-bit integers that mixes all bits."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class _RowKind(enum.Enum):
    """How a row is sampled; rows of one kind are sampled as one batch."""

    GREEDY = "greedy"
    FULL = "full"  # temperature (and min_p) over the whole vocabulary
    TOP_K = "top_k"  # among the k largest logits (then top_p, min_p)
    TOP_P = "top_p"  # among a window of the largest logits that holds the nucleus


def _row_kind(params: SamplingParams, vocab: int) -> _RowKind:
    """The kind of sampling a request's parameters call for."""
    if params.greedy:
        return _RowKind.GREEDY
    if 0 < params.top_k < vocab:
        return _RowKind.TOP_K
    if params.top_p < 1.0:
        return _RowKind.TOP_P
    return _RowKind.FULL


def _sample_rows(
    kind: _RowKind, logits: torch.Tensor, params: list[SamplingParams], uniforms: list[float]
) -> torch.Tensor:
    """One token per row of ``logits`` [R, V], all rows of ``kind``; returns [R]."""
    if kind is _RowKind.GREEDY:
        return logits.argmax(dim=-1)
    device = logits.device
    vocab = logits.shape[1]
    inv_temperature = _to_device(
        [1.0 / max(p.temperature, _MIN_TEMPERATURE) for p in params], torch.float32, device
    )  # [R]
    u = _to_device(uniforms, torch.float32, device)  # [R]
    uses_min_p = any(p.min_p > 0.0 for p in params)
    min_p = _to_device([p.min_p for p in params], torch.float32, device) if uses_min_p else None
    if kind is _RowKind.FULL:
        return _sample_full(logits, inv_temperature, min_p, u)
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    return _sample_top(logits, inv_temperature, min_p, u, top_k, [p.top_p for p in params])


def _sample_full(
    logits: torch.Tensor,
    inv_temperature: torch.Tensor,
    min_p: torch.Tensor | None,
    u: torch.Tensor,
) -> torch.Tensor:
    """Sample rows [F, V] without top_k / top_p over the whole vocabulary; returns [F].

    ``min_p`` [F] is None when no row uses it.
    """
    x_max = logits.amax(dim=-1, keepdim=True).float()  # [F, 1]
    scaled = logits.float().sub(x_max).mul_(inv_temperature[:, None])  # [F, V], ≤ 0
    if min_p is not None:
        # w = p / (p_max × min_p): min_p keeps exactly the tokens with w ≥ 1.
        scaled.sub_(min_p.clamp(min=_MIN_MIN_P).log()[:, None])
        weights = F.threshold(scaled.exp_(), _BELOW_ONE, 0.0)
    else:
        weights = scaled.exp_()  # [F, V], the top token weighs 1
    return _inverse_cdf(weights.cumsum_(dim=-1), u)


def _sample_top(
    logits: torch.Tensor,
    inv_temperature: torch.Tensor,
    min_p: torch.Tensor | None,
    u: torch.Tensor,
    top_k: list[int],
    top_p: list[float],
) -> torch.Tensor:
    """Sample rows [S, V] with top_k (``vocab`` = off) and / or top_p; returns [S].

    ``min_p`` [S] is None when no row uses it.
    """
    num_rows, vocab = logits.shape
    device = logits.device
    k = _to_device(top_k, torch.long, device)  # [S]
    # top_p = 1 becomes 2 so that float rounding of the cumulative sum never cuts.
    p = _to_device([tp if tp < 1.0 else 2.0 for tp in top_p], torch.float32, device)  # [S]
    # A top_p row without top_k renormalises over the whole row.
    needs_window = any(tk == vocab and tp < 1.0 for tk, tp in zip(top_k, top_p, strict=True))
    if needs_window:
        log_norm = torch.logsumexp(logits.float() * inv_temperature[:, None], dim=-1)  # [S]
    else:
        log_norm = torch.zeros(num_rows, device=device)

    max_k = max((tk for tk in top_k if tk < vocab), default=0)
    if not needs_window:
        widths = [max_k]
    elif device.type == "cpu":
        first = min(max(max_k, _TOP_P_WINDOWS_TOKENS[0]), vocab)
        widths = [first, *(w for w in (*_TOP_P_WINDOWS_TOKENS[1:], vocab) if first < w <= vocab)]
    else:
        widths = [vocab]

    token_ids, resolved = _sample_window(logits, widths[0], inv_temperature, min_p, u, k, p, log_norm)
    for width in widths[1:]:
        pending = (~resolved).nonzero().squeeze(1)  # [P]; one sync per retry, CPU only
        if pending.numel() == 0:
            break
        pending_ids, pending_resolved = _sample_window(
            logits.index_select(0, pending),
            width,
            inv_temperature[pending],
            None if min_p is None else min_p[pending],
            u[pending],
            k[pending],
            p[pending],
            log_norm[pending],
        )
        token_ids.index_copy_(0, pending, pending_ids)
        resolved.index_copy_(0, pending, pending_resolved)
    return token_ids


def _sample_window(
    logits: torch.Tensor,
    width: int,
    inv_temperature: torch.Tensor,
    min_p: torch.Tensor | None,
    u: torch.Tensor,
    k: torch.Tensor,
    p: torch.Tensor,
    log_norm: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample rows [S, V] among their ``width`` largest logits.

    Returns the token ids [S] and whether each is final [S]: a row is not when it
    has no top_k and its window holds less than top_p of the mass, so its nucleus
    may extend past the window.
    """
    vocab = logits.shape[1]
    if width < vocab:
        top = logits.topk(width, dim=-1)
        values, ids = top.values, top.indices  # [S, W], descending
    else:
        values, ids = logits.sort(dim=-1, descending=True)
    values = values.float() * inv_temperature[:, None]
    positions = torch.arange(width, device=logits.device)[None, :]  # [1, W]

    has_k = k < vocab
    in_k = values.masked_fill(positions >= k[:, None], -math.inf)
    log_norm = torch.where(has_k, torch.logsumexp(in_k, dim=-1), log_norm)
    probs = (in_k - log_norm[:, None]).exp()  # [S, W]
    cum = probs.cumsum(dim=-1)
    # The smallest prefix whose mass reaches top_p: token j is kept while the mass
    # before it is still short of top_p (so the first token always is).
    # Tokens past top_k already have zero probability, so they are never drawn.
    count = ((cum - probs) < p[:, None]).sum(dim=-1)  # [S]
    if min_p is not None:
        # p_j ≥ min_p × p_max  ⇔  x_j ≥ x_max + log(min_p); log(0) = -inf keeps all.
        count_min_p = (values >= values[:, :1] + min_p.log()[:, None]).sum(dim=-1)
        count = torch.minimum(count, count_min_p)

    weights = probs.masked_fill(positions >= count[:, None], 0.0)
    picked = _inverse_cdf(weights.cumsum_(dim=-1), u)  # [S], positions in the window
    token_ids = ids.gather(1, picked[:, None]).squeeze(1)
    resolved = has_k | (p > 1.0) | (cum[:, -1] >= p) | (width == vocab)
    return token_ids, resolved


def _inverse_cdf(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index [R] of the first cumulative weight in ``cdf`` [R, W] above ``u × total``."""
    total = cdf[:, -1:].contiguous()  # [R, 1]
    picked = torch.searchsorted(cdf, u[:, None] * total, right=True)  # [R, 1]
    # Should u × total ever reach total (rounding), clamp to the last token with
    # non-zero weight: the first whose cumulative weight reaches the total.
    last = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(picked, last).squeeze(1)


def _mask_min_tokens(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Logits with EOS and stop ids at -inf for rows still short of min_tokens.

    Returns ``logits`` itself when no row needs masking, else a masked copy.
    """
    vocab = logits.shape[1]
    rows: list[int] = []
    cols: list[int] = []
    for i, r in enumerate(requests):
        p = r.sampling_params
        if r.num_output_tokens < p.min_tokens:
            ids = {t for t in (*r.eos_token_ids, *p.stop_token_ids) if t < vocab}
            rows.extend([i] * len(ids))
            cols.extend(ids)
    if not rows:
        return logits
    masked = logits.clone()
    masked[_index(rows, logits.device), _index(cols, logits.device)] = -math.inf
    return masked


def _logprobs(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    rows: list[int],
    params: list[SamplingParams],
) -> list[TokenLogprobs]:
    """Raw-logit log-probabilities of the chosen and the top tokens of ``rows``."""
    index = _index(rows, logits.device)
    sub = logits if len(rows) == logits.shape[0] else logits.index_select(0, index)
    logprobs = torch.log_softmax(sub.float(), dim=-1)  # [L, V]
    chosen_ids = token_ids.index_select(0, index)  # [L]
    chosen = logprobs.gather(1, chosen_ids[:, None]).squeeze(1)  # [L]
    num_top = [params[i].logprobs or 0 for i in rows]
    top_values: list[list[float]] = [[] for _ in rows]
    top_ids: list[list[int]] = [[] for _ in rows]
    if max(num_top) > 0:
        top = logprobs.topk(min(max(num_top), logprobs.shape[1]), dim=-1)
        top_values, top_ids = top.values.tolist(), top.indices.tolist()
    return [
        TokenLogprobs(token_id=token_id, logprob=logprob, top=dict(zip(ids[:n], vals[:n], strict=True)))
        for token_id, logprob, n, ids, vals in zip(
            chosen_ids.tolist(), chosen.tolist(), num_top, top_ids, top_values, strict=True
        )
    ]


def _to_device(values: list[int] | list[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on ``device``, copied without waiting for queued kernels."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    """Row indices as a long tensor on ``device``."""
    return _to_device(rows, torch.long, device)
