"""The rollout engine: requests in, tokens + behaviour log-probs out.

    engine = Engine.from_pretrained(path, dtype="float32", max_num_seqs=64)
    outs = engine.generate(prompt_token_ids, SamplingParams(max_new_tokens=256, seed=0))
    outs = engine.generate([Request("traj-7", prompt, params, output_token_ids=earlier)],
                           max_chunk_tokens=512)            # continue a chunked trajectory
    engine.update_weights(model.named_parameters(), version=3)

Each ``step()`` is schedule -> one forward -> sample -> postprocess (rlcpm.rollout.scheduler).
Invalid requests come back with finish_reason "aborted" and ``error`` set, without stopping
the valid requests of the same call; ``generate`` raises only for a malformed call.
"""

from __future__ import annotations

import json
import numbers
import os
import random
import time
from collections.abc import Iterable
from collections.abc import Sequence as SequenceABC
from math import isfinite
from pathlib import Path
from typing import Any

import torch

from rlcpm.errors import EngineError, RequestError
from rlcpm.models.kv_cache import PagedKVCache
from rlcpm.rollout.block_manager import BlockManager
from rlcpm.rollout.fused_decoder import can_fuse
from rlcpm.rollout.model_runner import ModelRunner
from rlcpm.rollout.packed_linear import pack_linear_layers
from rlcpm.rollout.sampling import SamplingBatch, SamplingParams, is_int, sample
from rlcpm.rollout.scheduler import Scheduler
from rlcpm.rollout.sequence import Request, RequestOutput, Sequence
from rlcpm.rollout.speculative import Drafter, SpeculativeDecoder
from rlcpm.rollout.stop import StopChecker
from rlcpm.rollout.weight_sync import WeightSync

PromptsLike = SequenceABC[SequenceABC[int]] | SequenceABC[Request]


def _speculative_settings(speculative: Any):
    """A mapping or the recipe's `rollout.speculative` -> a validated SpeculativeConfig
    (unknown keys and wrong types are errors, as in a recipe: a typo must not turn FR-Spec off)."""
    from pydantic import ValidationError

    from rlcpm.config import SpeculativeConfig

    if isinstance(speculative, SpeculativeConfig):
        return speculative
    try:
        settings = dict(speculative)
        # paths as Engine.from_pretrained takes them: a pathlib.Path is a path, not a type error
        settings = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in settings.items()}
        return SpeculativeConfig.model_validate(settings)
    except (TypeError, ValueError, ValidationError) as err:
        raise EngineError(f"speculative settings {speculative!r}: {err}") from err


def _check_params_type(params: Any) -> None:
    """None or a SamplingParams: a dict of settings would fail deep inside (or, empty, mean the defaults)."""
    if params is not None and not isinstance(params, SamplingParams):
        raise RequestError(
            f"params must be a SamplingParams (or a list of them, one per prompt), got {type(params).__name__}"
            + (": build one with SamplingParams(**settings)" if isinstance(params, dict) else "")
        )


DEFAULT_BLOCK_SIZE = 16  # token slots per KV block (rollout workers use the default)


def _default_kv_budget_bytes(device: torch.device) -> int:
    """A quarter of the memory available now (GPU: free device memory)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4


class Engine:
    """Continuous-batching generation over a paged KV cache (see the module docstring).

    Args:
        model: an rlcpm.models CausalLM (the same definition the learner trains).
        tokenizer: needed only for stop strings (any HF tokenizer).
        max_num_seqs: sequences running at once.
        max_num_batched_tokens: tokens per forward (decodes + prefill chunks).
        kv_budget_bytes / kv_budget_gb: KV cache size; default: what max_num_seqs sequences of
            max_model_len tokens need, capped at a quarter of the free memory.
        block_size: token slots per KV block.
        max_model_len: context limit (default: the model's max_position_embeddings).
        eos_token_ids: token ids that end a request unless ignore_eos (default: the model
            config's eos_token_id, else the tokenizer's).
        seed: draws the seeds of requests that give none.
        pack_linears: on CPU in float32, run the linear layers on oneDNN-prepacked weights
            (rlcpm.rollout.packed_linear; one extra copy of the linear weights, faster decode).
        decode_mirror: on CPU with dense attention, decode over a contiguous copy of the
            running batch's KV (rlcpm.rollout.decode_attention) instead of gathering the
            paged cache every step.
        fused_decoder: on CPU in float32 with dense attention, run steps through the engine's
            FusedDecoder (rlcpm.rollout.fused_decoder: fused q/k/v and gate/up projections, one
            rotation per layer, fewer operators; its own (packed) copy of the linear weights,
            refreshed whenever the model's parameters change) instead of the model's forward.
        drafter: speculative decoding (rlcpm.rollout.speculative): a draft model sharing the
            tokenizer, its (FR-Spec) head and k; its KV cache shares the target's block ids,
            and the KV budget pays for both.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any = None,
        *,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        kv_budget_bytes: int | None = None,
        kv_budget_gb: float | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_model_len: int | None = None,
        eos_token_ids: Iterable[int] | None = None,
        seed: int = 0,
        pack_linears: bool = True,
        decode_mirror: bool = True,
        fused_decoder: bool = True,
        drafter: Drafter | None = None,
    ):
        for name, value, may_be_none in (
            ("max_num_seqs", max_num_seqs, False),
            ("max_num_batched_tokens", max_num_batched_tokens, False),
            ("block_size", block_size, False),
            ("max_model_len", max_model_len, True),  # None: the model's limit
        ):
            if not (may_be_none and value is None) and (not is_int(value) or value < 1):
                accepted = "an int >= 1 or None (the model's limit)" if may_be_none else "an int >= 1"
                raise EngineError(f"{name} must be {accepted}, got {value!r}")
        config = model.config
        if config.attention == "sparse":  # the compressed keys live in KV blocks: refuse a misfit now
            from rlcpm.kernels.infllm_v2 import InfLLMv2Config

            InfLLMv2Config.from_dict(config.sparse_config).check_kv_block_size(block_size)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.vocab_size = config.vocab_size
        self.device = model.device
        self.eos_token_ids = frozenset(
            self._eos_ids(config, tokenizer) if eos_token_ids is None else eos_token_ids
        )
        max_model_len = min(max_model_len or config.max_position_embeddings, config.max_position_embeddings)
        bytes_per_block = PagedKVCache.block_bytes(
            config.num_hidden_layers, block_size, config.num_key_value_heads, config.head_dim, model.dtype
        )
        if drafter is not None:
            bytes_per_block += drafter.kv_block_bytes(block_size)
        if kv_budget_gb is not None:
            if kv_budget_bytes is not None:
                raise EngineError("give kv_budget_bytes or kv_budget_gb, not both")
            if not (isinstance(kv_budget_gb, numbers.Real) and isfinite(kv_budget_gb)):
                raise EngineError(
                    f"kv_budget_gb must be a finite number or None (automatic), got {kv_budget_gb!r}"
                )
            kv_budget_bytes = int(kv_budget_gb * 1024**3)
        elif kv_budget_bytes is not None and not isinstance(kv_budget_bytes, numbers.Integral):
            raise EngineError(f"kv_budget_bytes must be an int or None (automatic), got {kv_budget_bytes!r}")
        if kv_budget_bytes is None:
            wanted = max_num_seqs * -(-max_model_len // block_size) * bytes_per_block
            kv_budget_bytes = min(wanted, _default_kv_budget_bytes(self.device))
        num_blocks = kv_budget_bytes // bytes_per_block
        if num_blocks < 1:
            raise EngineError(
                f"kv budget of {kv_budget_bytes} bytes is smaller than one KV block ({bytes_per_block} bytes)"
            )
        cache_tokens = num_blocks * block_size
        self.max_model_len = min(max_model_len, cache_tokens)
        self._context_note = (  # a refusal says so when the KV budget, not the model, sets the context
            f" (the KV cache holds {cache_tokens} tokens: set a larger kv_budget_gb or kv_budget_bytes)"
            if cache_tokens < max_model_len
            else ""
        )
        self.kv_cache = model.new_kv_cache(num_blocks, block_size)
        self.block_manager = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs,
            max_num_batched_tokens,
            self.max_model_len,
            num_lookahead_tokens=drafter.num_draft_tokens if drafter is not None else 0,
        )
        use_mirror = decode_mirror and drafter is None
        # the fused decoder keeps its own packed weights: packing the model too would copy them twice
        use_fused = fused_decoder and drafter is None and can_fuse(model)
        if pack_linears and not use_fused:
            pack_linear_layers(model)
            if drafter is not None:
                drafter.pack_linears()
        self.runner = ModelRunner(model, self.kv_cache, use_mirror, use_fused, pack_linears)
        self.speculator = (
            SpeculativeDecoder(model, self.kv_cache, drafter, self.max_model_len)
            if drafter is not None
            else None
        )
        self.weights = WeightSync(model)
        self._seed_rng = random.Random(seed)
        self._next_seq_id = 0
        self._num_calls = 0
        self.stats = {"num_prefill_tokens": 0, "num_decode_tokens": 0, "num_steps": 0, "step_seconds": 0.0}

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "cpu",
        tokenizer_path: str | None = None,
        attention: str = "dense",
        sparse_config: dict | None = None,
        speculative: Any = None,
        draft_keep_token_ids: Iterable[int] = (),
        **engine_kwargs: Any,
    ) -> Engine:
        """Load a Hugging Face directory (config.json + safetensors + tokenizer) into an engine.

        EOS ids come from generation_config.json when present (as transformers ``generate``),
        else from config.json / the tokenizer. ``attention`` names the attention backend;
        ``sparse_config`` overrides the checkpoint's InfLLM v2 settings key by key (attention="sparse").
        ``speculative``: ``{draft, num_draft_tokens, frspec_vocab}`` (a mapping or the recipe's
        ``rollout.speculative``) turns on speculative decoding (docs/speculative.md); the FR-Spec
        subset always holds the EOS ids and ``draft_keep_token_ids`` (a recipe's stop token ids).
        """
        from rlcpm.models import load_model, load_tokenizer

        model = load_model(path, dtype=dtype, device=device, attention=attention, sparse_config=sparse_config)
        tokenizer = load_tokenizer(tokenizer_path or path)
        generation_config = Path(path) / "generation_config.json"
        if "eos_token_ids" not in engine_kwargs and generation_config.exists():
            eos = json.loads(generation_config.read_text()).get("eos_token_id")
            if eos is not None:
                engine_kwargs["eos_token_ids"] = [eos] if isinstance(eos, int) else eos
        if speculative is not None:
            spec = _speculative_settings(speculative)
            eos_ids = engine_kwargs.get("eos_token_ids") or cls._eos_ids(model.config, tokenizer)
            engine_kwargs["drafter"] = Drafter.from_pretrained(
                spec.draft,
                spec.num_draft_tokens,
                spec.frspec_vocab,
                dtype=model.dtype,
                device=model.device,
                tokenizer=tokenizer,
                keep_token_ids={*eos_ids, *draft_keep_token_ids},
            )
        return cls(model, tokenizer, **engine_kwargs)

    @staticmethod
    def _eos_ids(config: Any, tokenizer: Any) -> set[int]:
        eos = config.eos_token_id
        if eos is None and tokenizer is not None:
            eos = tokenizer.eos_token_id
        if eos is None:
            return set()
        return {eos} if isinstance(eos, int) else set(eos)

    @property
    def weight_version(self) -> int:
        return self.weights.version

    # ------------------------------------------------------------------------------ requests

    def add_request(
        self, request: Request, params: SamplingParams | None = None, max_chunk_tokens: int | None = None
    ) -> Sequence:
        """Validate and queue one request (resuming its paused KV when it matches); RequestError if invalid."""
        _check_params_type(request.params)
        _check_params_type(params)
        params = request.params or params or SamplingParams()
        self._validate(request, params, max_chunk_tokens)
        tokens = list(request.prompt_token_ids) + list(request.output_token_ids)
        seq = self.scheduler.take_paused(request.request_id)
        if seq is not None and (
            seq.token_ids != tokens or seq.num_prompt_tokens != len(request.prompt_token_ids)
        ):
            self.block_manager.free(seq)
            seq = None
        if seq is None:
            seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
            seq = Sequence(self._next_seq_id, request, params, seed, self.block_manager.block_size)
            self._next_seq_id += 1
            if params.stop:
                seq.stop_checker = StopChecker(self.tokenizer, params.stop, request.output_token_ids)
        else:
            if params.seed is not None:
                seq.seed = params.seed
            if params.stop != seq.params.stop:
                seq.stop_checker = (
                    StopChecker(self.tokenizer, params.stop, request.output_token_ids)
                    if params.stop
                    else None
                )
            seq.params = params
        seq.finish_reason = None
        seq.start_call(max_chunk_tokens)
        self.scheduler.add(seq)
        return seq

    def _validate(self, request: Request, params: SamplingParams, max_chunk_tokens: int | None) -> None:
        params.validate(self.vocab_size)
        prompt, previous = list(request.prompt_token_ids), list(request.output_token_ids)
        if not prompt:
            raise RequestError(f"request {request.request_id!r}: the prompt is empty")
        not_ints = [
            t for t in prompt + previous if isinstance(t, bool) or not isinstance(t, numbers.Integral)
        ]
        if not_ints:
            raise RequestError(
                f"request {request.request_id!r}: token ids must be ints, got {not_ints[0]!r} "
                f"({type(not_ints[0]).__name__}); pass a list of ints (tensor.tolist())"
            )
        bad = [t for t in prompt + previous if not (0 <= t < self.vocab_size)]
        if bad:
            raise RequestError(
                f"request {request.request_id!r}: token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})"
            )
        if len(prompt) + len(previous) >= self.max_model_len:
            raise RequestError(
                f"request {request.request_id!r}: {len(prompt) + len(previous)} prompt + earlier tokens leave "
                f"no room in the context of {self.max_model_len} tokens{self._context_note}"
            )
        if len(previous) >= params.max_new_tokens:
            raise RequestError(
                f"request {request.request_id!r}: already has {len(previous)} generated tokens, "
                f"max_new_tokens is {params.max_new_tokens}"
            )
        if params.stop and self.tokenizer is None:
            raise RequestError(
                f"request {request.request_id!r}: stop strings need an engine with a tokenizer"
            )
        if max_chunk_tokens is not None and (
            isinstance(max_chunk_tokens, bool)
            or not isinstance(max_chunk_tokens, numbers.Integral)
            or max_chunk_tokens <= 0
        ):
            raise RequestError(f"max_chunk_tokens must be an int > 0 or None, got {max_chunk_tokens!r}")

    # ---------------------------------------------------------------------------------- step

    def step(self) -> list[Sequence]:
        """One forward for the scheduled batch; returns the sequences that finished or paused
        (none, without a forward, once no request is waiting or running)."""
        if not self.scheduler.has_unfinished:
            return []
        start = time.perf_counter()
        self.weights.check_consistent()
        try:
            batch = self.scheduler.schedule()
            if not batch.seqs:
                raise EngineError(
                    "no request could be scheduled: the KV cache is too small for the waiting request"
                )
            if self.speculator is not None:  # draft k tokens, verify them in one forward, accept
                token_ids, logprobs = self.speculator.step(batch)
            else:
                token_ids, logprobs = self._sample(batch, self.runner.run(batch))
        except BaseException:
            # schedule() registered this step's full blocks for prefix sharing before the forward
            # wrote their KV: a failed or interrupted forward must not leave them to be shared
            self.block_manager.reset_prefix_cache()
            raise
        num_decode = sum(1 for n in batch.num_query_tokens if n == 1)
        self.stats["num_decode_tokens"] += num_decode
        self.stats["num_prefill_tokens"] += batch.num_tokens - num_decode
        done = self.scheduler.postprocess(batch, token_ids, logprobs, self.eos_token_ids)
        self.stats["num_steps"] += 1
        self.stats["step_seconds"] += time.perf_counter() - start
        return done

    def _sample(self, batch, logits: torch.Tensor) -> tuple[list[int], list[float]]:
        """One token and its behaviour log-prob per sampling sequence (batch order)."""
        sampling = [seq for i, seq in enumerate(batch.seqs) if batch.is_sampling(i)]
        if not sampling:
            return [], []
        params = SamplingBatch.from_params(
            [s.params for s in sampling], [s.seed for s in sampling], [s.num_generated for s in sampling]
        )
        ids, lps = sample(logits, params)
        return ids.tolist(), lps.tolist()

    # ------------------------------------------------------------------------------ generate

    def generate(
        self,
        prompts: PromptsLike,
        params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        max_chunk_tokens: int | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (token id lists or Requests); outputs in input order.

        params: one SamplingParams for all, or one per prompt (a Request's own params win).
        max_chunk_tokens: at most this many new tokens per request in this call; a request
        that reaches it returns with finish_reason "chunk" and keeps its KV (until the next
        weight update or memory pressure) for a continuation ``Request`` with the same id.
        """
        self.weights.check_consistent()
        requests = self._as_requests(prompts)
        self._num_calls += 1
        if isinstance(params, SequenceABC):
            if len(params) != len(requests):
                raise RequestError(f"got {len(params)} SamplingParams for {len(requests)} prompts")
            per_request = list(params)
        else:
            per_request = [params] * len(requests)
        for request_params in per_request:
            _check_params_type(request_params)
        seen: set = set()
        outputs: list[RequestOutput | None] = [None] * len(requests)
        seqs: dict[int, Sequence] = {}
        try:
            for index, (request, request_params) in enumerate(zip(requests, per_request)):
                try:
                    if request.request_id in seen:
                        raise RequestError(f"request id {request.request_id!r} appears twice in one call")
                    seen.add(request.request_id)
                    seqs[index] = self.add_request(request, request_params, max_chunk_tokens)
                except RequestError as error:
                    outputs[index] = self._aborted(request, str(error))
            while self.scheduler.has_unfinished:
                self.step()
        except BaseException:  # an interrupt, a failed forward: this call's requests leave no trace
            self.scheduler.discard(seqs.values())
            raise
        for index, seq in seqs.items():
            outputs[index] = seq.to_output(self.weight_version)
        return outputs  # type: ignore[return-value]

    def _as_requests(self, prompts: PromptsLike) -> list[Request]:
        requests = []
        for prompt in prompts:
            if isinstance(prompt, Request):
                requests.append(prompt)
            else:
                ids = prompt.tolist() if hasattr(prompt, "tolist") else prompt  # tensors, arrays
                if isinstance(ids, str | bytes) or not isinstance(ids, Iterable):
                    raise RequestError(
                        f"generate takes a list of prompts, each a list of token ids (or Requests); "
                        f"got a prompt {prompt!r} ({type(prompt).__name__}): wrap one prompt in a list, "
                        "generate([token_ids]), and tokenize text first"
                    )
                ids = list(ids)
                requests.append(Request(f"call{self._num_calls}-{len(requests)}", ids))
        return requests

    def _aborted(self, request: Request, error: str) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=list(request.prompt_token_ids),
            token_ids=[],
            logprobs=[],
            finish_reason="aborted",
            weight_version=self.weight_version,
            num_previous_tokens=len(request.output_token_ids),
            error=error,
        )

    def drop_paused(self, request_ids: Iterable[Any] | None = None) -> int:
        """Free the KV kept for paused requests (all when None); returns how many were freed."""
        if isinstance(request_ids, str | bytes | int):  # one id, not an iterable of ids
            request_ids = [request_ids]
        return self.scheduler.drop_paused(request_ids)

    # ------------------------------------------------------------------------------- weights

    def update_weights(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        version: int | None = None,
        strict: bool = True,
    ) -> dict[str, float]:
        """Copy new weights into the model in place, tensor by tensor (no second full copy).

        Every name, shape and dtype is checked (WeightSyncError naming the tensor); with
        ``strict`` every parameter must be sent. After a failure the engine refuses to generate
        until a complete update succeeds. All cached and paused KV is dropped (it belongs to
        the old weights). Returns timing stats; ``weight_version`` becomes ``version``
        (default: the old version + 1).
        """
        self._drop_kv_of_old_weights()
        return self.weights.update(named_tensors, version, strict)

    def begin_weight_update(self, version: int) -> None:
        """Start an update that arrives in parts (`load_weights` per bucket, then
        `finish_weight_update`), for a learner that streams to several engines bucket by bucket.
        The engine refuses to generate until `finish_weight_update` has checked that every
        parameter arrived; only then does ``weight_version`` become ``version``."""
        self._drop_kv_of_old_weights()
        self.weights.begin(version)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """One part of the update begun by `begin_weight_update`, copied in place (checked as
        in `update_weights`)."""
        self.weights.load(named_tensors)

    def finish_weight_update(self) -> dict[str, float]:
        """End the update begun by `begin_weight_update` (WeightSyncError if a parameter is
        missing; the engine then still refuses to generate). Returns `update_weights`' stats."""
        return self.weights.finish()

    def _drop_kv_of_old_weights(self) -> None:
        self.scheduler.drop_all_kv()
        self.block_manager.reset_prefix_cache()
        if self.runner.decode_backend is not None:
            self.runner.decode_backend.invalidate()

    def engine_stats(self) -> dict[str, float]:
        """Counters for monitoring: tokens, steps, time, preemptions, prefix-cache hits, KV use."""
        bm = self.block_manager
        return {
            **self.stats,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_prefix_cache_hit_blocks": bm.num_prefix_hits,
            "num_kv_blocks": bm.num_blocks,
            "num_free_kv_blocks": bm.num_free_blocks,
            "num_paused": len(self.scheduler.paused),
            "weight_version": self.weight_version,
            **{f"last_sync_{k}": v for k, v in self.weights.last_sync.items()},
            **(self.speculator.engine_stats() if self.speculator is not None else {}),
        }
