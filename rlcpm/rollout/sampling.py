"""Sampling parameters, the sampler, and THE definition of a behaviour log-prob.

The engine records, for every sampled token, its log-prob under the distribution it was
actually sampled from, and the learner recomputes the same quantity with the same function:

    logprob(token) = log_softmax(filter(logits / temperature))[token]

where ``filter`` keeps the top-k logits (ties at the k-th value are kept), then the top-p
nucleus of what is left (renormalised): a token is kept when the probability mass of the
tokens strictly more likely than it is < top_p, so the most likely token is always kept
(tied tokens are kept or dropped together). top_k <= 0 and top_p >= 1
disable the filters; with both disabled this is plain ``log_softmax(logits / temperature)``.
Greedy decoding (temperature 0) takes the argmax and records ``log_softmax(logits)``.

Random numbers are counter-based: the uniform that picks the token at generated index t of a
request is ``hash(seed, t)`` (splitmix64), so seeded sampling does not depend on which other
requests share the batch, and a generation continued from its first t tokens draws the same
numbers as one that never stopped. A token is drawn by inverting the CDF of the filtered
distribution in vocabulary order with that single uniform.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from math import isfinite
from typing import Any

import numpy as np
import torch

from rlcpm.errors import RequestError


@dataclass
class SamplingParams:
    """How to sample one request.

    temperature 0 is greedy. top_k <= 0 (-1) and top_p == 1 disable those filters.
    ``stop_token_ids`` and ``stop`` (strings) end the request with finish_reason "stop"; the
    stopping token (and so the stop string) is included in the output. EOS (from the model's
    generation config / tokenizer) stops too unless ``ignore_eos``. ``seed`` None: the engine
    draws a seed for the request. ``max_new_tokens`` counts every generated token of the
    request, including tokens generated in earlier chunks.
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    stop: Sequence[str] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        stop_ids = self.stop_token_ids
        if stop_ids is None:
            stop_ids = ()
        elif hasattr(stop_ids, "tolist"):  # a tensor or numpy array (`or ()` would be ambiguous)
            stop_ids = stop_ids.tolist()
        if isinstance(stop_ids, numbers.Integral) and not isinstance(stop_ids, bool):
            stop_ids = (stop_ids,)  # one id, as `stop` takes one string
        self.stop_token_ids = tuple(_plain_int(t) for t in stop_ids)
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        # numpy integers become ints (seeds are hashed, counts compared, ids sent to Ray)
        self.max_new_tokens, self.top_k = _plain_int(self.max_new_tokens), _plain_int(self.top_k)
        self.seed = _plain_int(self.seed)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def validate(self, vocab_size: int) -> None:
        """Raise RequestError naming the first invalid field."""
        if not is_int(self.max_new_tokens):
            raise RequestError(f"max_new_tokens must be an int, got {self.max_new_tokens!r}")
        if self.max_new_tokens <= 0:
            raise RequestError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise RequestError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
        if not isfinite(self.temperature) or self.temperature < 0:
            raise RequestError(f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if not is_int(self.top_k):
            raise RequestError(f"top_k must be an int (-1 disables it), got {self.top_k!r}")
        if self.seed is not None and not is_int(self.seed):
            raise RequestError(f"seed must be an int or None, got {self.seed!r}")
        for token_id in self.stop_token_ids:
            if not is_int(token_id) or not (0 <= token_id < vocab_size):
                raise RequestError(f"stop token id {token_id!r} is outside the vocabulary [0, {vocab_size})")
        for text in self.stop:
            if not isinstance(text, str) or not text:
                raise RequestError(f"stop strings must be non-empty strings, got {text!r}")


def is_int(value: Any) -> bool:
    """An integer, and not a bool (True is an int to Python, never a seed or a count here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _plain_int(value: Any) -> Any:
    """A numpy integer as a Python int; anything else unchanged (validate() judges it)."""
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool | int) else value


def _as_column(
    value: torch.Tensor | float | int, num_rows: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A per-row parameter as a [N, 1] tensor."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype).reshape(-1, 1).expand(num_rows, 1)
    return torch.full((num_rows, 1), value, dtype=dtype, device=device)


def filter_logits(
    logits: torch.Tensor, top_k: torch.Tensor | int = -1, top_p: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering; removed entries become -inf.

    logits: [N, V] (already divided by the temperature); top_k, top_p: scalars or [N].
    top-k keeps the logits >= the k-th largest; top-p then keeps a token when the mass (under
    the top-k-renormalised distribution) of the tokens strictly more likely than it is < top_p.
    Both rules are thresholds on the logit, so tied tokens are kept or dropped together and
    the result does not depend on any sort order. Rows with top_k <= 0 and top_p >= 1 come
    back unchanged, whatever the other rows ask.

    Only a window of the largest logits is sorted (``topk``), grown while some row's nucleus
    may extend past it; the full vocabulary is sorted only in the worst case.
    """
    num_rows, vocab = logits.shape
    k = _as_column(top_k, num_rows, torch.long, logits.device)
    p = _as_column(top_p, num_rows, logits.dtype, logits.device)
    use_k = (k > 0) & (k < vocab)  # [N, 1]
    use_p = p < 1
    if not bool(use_k.any() or use_p.any()):
        return logits
    window = min(vocab, max(int(k[use_k].max()) if bool(use_k.any()) else 1, 64 if bool(use_p.any()) else 1))
    while True:
        values = logits.topk(window, dim=-1).values  # [N, W], descending
        kth = values.gather(1, (k.clamp(1, window) - 1))
        threshold = torch.where(use_k, kth, float("-inf"))  # [N, 1]
        if not bool(use_p.any()):
            break
        top = values[:, :1]
        # normaliser over every token the top-k rule keeps (vocabulary order: ties included)
        norm = (logits - top).exp_().masked_fill_(logits < threshold, 0.0).sum(dim=-1, keepdim=True)
        probs = (values - top).exp_().masked_fill_(values < threshold, 0.0) / norm  # [N, W]
        mass_before = probs.cumsum(dim=-1) - probs
        positions = torch.arange(window, device=logits.device).expand(num_rows, window)
        is_group_start = torch.ones_like(values, dtype=torch.bool)
        is_group_start[:, 1:] = values[:, 1:] != values[:, :-1]
        group_start = torch.where(is_group_start, positions, 0).cummax(dim=-1).values
        mass_strictly_above = mass_before.gather(1, group_start)
        # the most likely tokens (group 0) always stay, also when top_p rounds to 0.0 in float32
        keep = ((mass_strictly_above < p) | (group_start == 0)) & (values >= threshold)
        if window < vocab and bool((use_p & keep[:, -1:]).any()):
            window = min(vocab, window * 8)  # the nucleus may reach past the window
            continue
        cut = values.masked_fill(~keep, float("inf")).min(dim=-1, keepdim=True).values
        threshold = torch.where(use_p, torch.maximum(threshold, cut), threshold)
        break
    return logits.masked_fill(logits < threshold, float("-inf"))


def _scale(logits: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """logits / temperature in float32 ([N, V]); greedy rows (temperature 0) are divided by 1."""
    if isinstance(temperature, torch.Tensor):
        if bool(((temperature == 0) | (temperature == 1)).all()):
            return logits.float()
        t = _as_column(temperature, logits.shape[0], torch.float32, logits.device)
        return logits.float() / torch.where(t == 0, torch.ones_like(t), t)
    return logits.float() if temperature in (0, 1) else logits.float() / temperature


def sampling_log_distribution(
    logits: torch.Tensor,
    temperature: torch.Tensor | float = 1.0,
    top_k: torch.Tensor | int = -1,
    top_p: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """``log_softmax(filter(logits / temperature))``: logits [N, V] -> float32 log-probs [N, V].

    temperature / top_k / top_p: scalars or [N]. Rows with temperature 0 (greedy) get
    ``log_softmax(logits)`` (no temperature, no filter). Filtered-out entries are -inf.
    """
    num_rows = logits.shape[0]
    scaled = _scale(logits, temperature)
    device = logits.device
    is_greedy = _as_column(temperature, num_rows, torch.float32, device) == 0  # [N, 1]
    if bool(is_greedy.any()):
        top_k = torch.where(is_greedy, -1, _as_column(top_k, num_rows, torch.long, device)).squeeze(1)
        top_p = torch.where(is_greedy, 1.0, _as_column(top_p, num_rows, torch.float32, device)).squeeze(1)
    return filter_logits(scaled, top_k, top_p).log_softmax(dim=-1)


def sampling_logprobs(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    temperature: torch.Tensor | float = 1.0,
    top_k: torch.Tensor | int = -1,
    top_p: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Log-prob of ``token_ids`` under the sampling distribution: THE engine/learner definition.

    logits: [..., V] (any dtype; computed in float32); token_ids: [...] -> float32 [...].
    temperature / top_k / top_p: scalars, or tensors with one value per row of the flattened
    leading dims. temperature 0 (greedy) gives ``log_softmax(logits)[token]``.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    log_dist = sampling_log_distribution(flat, temperature, top_k, top_p)  # [N, V]
    return log_dist.gather(1, token_ids.reshape(-1, 1)).reshape(token_ids.shape)


# --------------------------------------------------------------------------- counter-based RNG

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def counter_uniforms(seeds: Sequence[int], counters: Sequence[int]) -> np.ndarray:
    """One uniform in [0, 1) per row from (seed, counter) alone: float64 [N]."""
    seed_arr = np.array([s & 0xFFFFFFFFFFFFFFFF for s in seeds], dtype=np.uint64)
    counter_arr = np.asarray(counters, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = _mix64(_mix64(seed_arr) + (counter_arr + np.uint64(1)) * _GOLDEN)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# ----------------------------------------------------------------------------------- sampler


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of one decode step (rows = sequences that sample now)."""

    temperature: torch.Tensor  # [N] float32, 0 = greedy
    top_k: torch.Tensor  # [N] long, <= 0 disabled
    top_p: torch.Tensor  # [N] float32
    seeds: list[int]
    counters: list[int]  # generated index of the token being sampled
    is_all_greedy: bool

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], seeds: Sequence[int], counters: Sequence[int]):
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32)
        return cls(
            temperature=temperature,
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.long),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32),
            seeds=list(seeds),
            counters=list(counters),
            is_all_greedy=all(p.temperature == 0 for p in params),
        )


_CDF_BLOCK = 256


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative probability exceeds u * total.

    probs: [N, V] (>= 0, not necessarily normalised); uniforms: float64 [N] in [0, 1) -> [N].
    Two levels, so no sequential scan runs over the whole vocabulary: float64 sums of blocks of
    256 entries pick the block, a cumulative sum inside that block picks the entry. Zero-
    probability entries are never returned.
    """
    num_rows, vocab = probs.shape
    pad = -vocab % _CDF_BLOCK
    if pad:
        probs = torch.nn.functional.pad(probs, (0, pad))
    blocks = probs.view(num_rows, -1, _CDF_BLOCK)  # [N, nb, B]
    block_cdf = blocks.sum(dim=-1, dtype=torch.float64).cumsum(dim=-1)  # [N, nb]
    targets = (uniforms.to(block_cdf.device) * block_cdf[:, -1]).unsqueeze(1)  # [N, 1]
    block = torch.searchsorted(block_cdf, targets, right=True).clamp_(max=blocks.shape[1] - 1)  # [N, 1]
    mass_before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    rows = torch.arange(num_rows, device=probs.device)
    inside = blocks[rows, block.squeeze(1)]  # [N, B]
    inside_cdf = mass_before + inside.cumsum(dim=-1, dtype=torch.float64)
    offset = torch.searchsorted(inside_cdf, targets, right=True).squeeze(1)
    last_positive = _CDF_BLOCK - 1 - (inside > 0).flip(-1).int().argmax(dim=-1)  # rounding guard
    return block.squeeze(1) * _CDF_BLOCK + torch.minimum(offset, last_positive)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row and its behaviour log-prob: logits [N, V] -> (ids [N], logprobs [N]).

    The log-prob is read from ``sampling_log_distribution`` (so it is ``sampling_logprobs``).
    """
    logits = logits.float()  # bfloat16 logits: exact, and CPU argmax is far faster in float32
    if batch.is_all_greedy:  # temperature 0: no scaling, no filter (what sampling_log_distribution does)
        token_ids = logits.argmax(dim=-1)
        return token_ids, logits.log_softmax(dim=-1).gather(1, token_ids[:, None]).squeeze(1)
    log_dist = sampling_log_distribution(logits, batch.temperature, batch.top_k, batch.top_p)  # [N, V]
    uniforms = torch.from_numpy(counter_uniforms(batch.seeds, batch.counters))
    sampled = inverse_cdf(log_dist.exp(), uniforms)
    token_ids = torch.where(batch.temperature.to(sampled.device) == 0, logits.argmax(dim=-1), sampled)
    return token_ids, log_dist.gather(1, token_ids[:, None]).squeeze(1)
