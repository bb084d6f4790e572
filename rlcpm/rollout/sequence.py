"""Per-request state: tokens, behaviour log-probs, KV block table, progress, status."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

from rlcpm.rollout.sampling import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()  # no KV yet (new, preempted, or to be re-prefilled)
    RUNNING = auto()  # scheduled: prefilling or decoding
    PAUSED = auto()  # hit its chunk budget; KV kept for a continuation under the same weights
    FINISHED = auto()


@dataclass
class Request:
    """One generation request, possibly the continuation of an earlier chunk.

    ``output_token_ids`` are tokens already generated for this request (earlier chunks);
    generation continues after them with random stream index ``len(output_token_ids)``. If the
    engine still holds the paused KV of ``request_id`` under the current weights it is reused,
    otherwise prompt + output_token_ids are prefilled again. ``params`` None: the params given
    to ``generate``.
    """

    request_id: Any
    prompt_token_ids: list[int]
    params: SamplingParams | None = None
    output_token_ids: list[int] = field(default_factory=list)


@dataclass
class RequestOutput:
    """What one request produced in one ``generate`` call.

    token_ids / logprobs: the tokens generated in this call and their behaviour log-probs
    (``rlcpm.rollout.sampling.sampling_logprobs``). finish_reason: "stop" (EOS, a stop token id
    or a stop string, which are included in token_ids), "length" (max_new_tokens or the context
    is full), "chunk" (the call's max_chunk_tokens was reached; continue with a Request) or
    "aborted" (invalid request; ``error`` says why).
    """

    request_id: Any
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    weight_version: int
    seed: int | None = None
    num_previous_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    error: str | None = None


class Sequence:
    """A request inside the engine. ``token_ids`` = prompt + every generated token."""

    def __init__(self, seq_id: int, request: Request, params: SamplingParams, seed: int, block_size: int):
        self.seq_id = seq_id
        self.request_id = request.request_id
        self.params = params
        self.seed = seed
        self.block_size = block_size
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_previous_tokens = len(request.output_token_ids)
        self.token_ids: list[int] = list(request.prompt_token_ids) + list(request.output_token_ids)
        self.new_logprobs: list[float] = []
        self.block_table: list[int] = []
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.kv_epoch = 0  # bumped whenever the KV is freed: copies keyed by it go stale
        self.num_cached_prompt_tokens = 0  # of those, reused from the prefix cache at admission
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.chunk_budget: int | None = None  # new tokens this call may still generate
        self.stop_checker: Any = None  # rlcpm.rollout.stop.StopChecker when stop strings are set

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        """Generated tokens including earlier chunks: the random stream index of the next one."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_new_tokens(self) -> int:
        return len(self.new_logprobs)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_blocks_needed(self) -> int:
        return (len(self.token_ids) + self.block_size - 1) // self.block_size

    def block_tokens(self, index: int) -> tuple[int, ...]:
        return tuple(self.token_ids[index * self.block_size : (index + 1) * self.block_size])

    def append(self, token_id: int, logprob: float) -> None:
        self.token_ids.append(token_id)
        self.new_logprobs.append(logprob)
        if self.chunk_budget is not None:
            self.chunk_budget -= 1

    def start_call(self, chunk_budget: int | None) -> None:
        """Begin a generate call: reset the per-call outputs and the chunk budget."""
        self.new_logprobs = []
        self.chunk_budget = chunk_budget

    def to_output(self, weight_version: int) -> RequestOutput:
        start = len(self.token_ids) - self.num_new_tokens
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            token_ids=self.token_ids[start:],
            logprobs=list(self.new_logprobs),
            finish_reason=self.finish_reason or "aborted",
            weight_version=weight_version,
            seed=self.seed,
            num_previous_tokens=start - self.num_prompt_tokens,
            num_cached_prompt_tokens=self.num_cached_prompt_tokens,
        )
