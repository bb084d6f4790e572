"""Speculative sampling inside the engine: draft k tokens, verify them in one target forward.

One round for every decoding sequence of a step (Leviathan et al. 2023, Chen et al. 2023),
with the draft's LM head restricted to a frequency-ranked subset (FR-Spec, arXiv 2502.14856):

    draft   x_1 .. x_k chained through the small draft model, x_i ~ q_i, where q_i is the
            draft's sampling distribution over the subset (0 outside it)
    verify  ONE target forward over [last, x_1 .. x_k] (k + 1 positions, paged KV cache)
            -> p_1 .. p_{k+1}, the target's sampling distributions
    accept  greedy:   the longest prefix with x_i == argmax p_i, then argmax p_{n+1}
            sampling: x_i is kept with probability min(1, p_i(x_i) / q_i(x_i)); at the first
                      rejection emit y ~ norm(max(0, p_i - q_i)); all k kept: bonus y ~ p_{k+1}
    rollback rejected tokens are forgotten by moving ``num_computed_tokens`` back: their KV
            slots (target and draft) are simply overwritten later

Every emitted token is distributed exactly as the target's sampling distribution
``softmax(filter(logits / T))`` (the engine's THE definition, top-k/top-p included), and the
recorded log-prob is the target's, ``log p(y)`` — what RL needs. p and q are both the
*processed* distributions (temperature, top-k, top-p; q's filter acts on the subset).

Bookkeeping. The draft model keeps its own paged KV cache with the same block ids as the
target (one block table per sequence addresses both), so the block manager, prefix sharing,
preemption and chunk pauses work unchanged; a block is registered for sharing only once both
caches hold it. Prefill chunks run through both models in lockstep. After a round, the
target has KV for the tokens before the last emitted one; the draft for those too, except
that after an all-accepted round it lags by one token (x_k was never fed to it), which the
next round's first draft forward catches up on (it takes 2 tokens instead of 1).

Random numbers are counter-based like the plain sampler: the uniforms used for the token at
generated index t of a request come from (seed, t) on separate streams (draft sample,
acceptance test, target sample), so a seeded request draws the same tokens whatever else is
in the batch and however it is scheduled or preempted. The tokens differ from plain sampling
with the same seed (a different coupling of the same distribution), and a round's length
depends on where it starts, so a generation cut into chunks at other points (or run with
another k or draft) draws other — equally distributed — tokens; greedy decoding is
token-identical to plain greedy decoding in every case.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

import numpy as np
import torch

from rlcpm.errors import EngineError
from rlcpm.models.kv_cache import PagedKVCache
from rlcpm.models.metadata import AttentionMetadata
from rlcpm.rollout.draft_head import DraftHead
from rlcpm.rollout.packed_linear import pack_linear_layers
from rlcpm.rollout.sampling import SamplingBatch, counter_uniforms, inverse_cdf, sampling_log_distribution
from rlcpm.rollout.scheduler import ScheduledBatch
from rlcpm.rollout.sequence import Sequence as Seq

# Random streams (mixed into the request seed): the target sample (residual / bonus) uses the
# plain sampler's stream 0, so an emitted target sample is drawn like a plain one.
_DRAFT_STREAM, _ACCEPT_STREAM = 0x5EED_D4AF, 0x5EED_ACC7
_MASK64 = (1 << 64) - 1


def stream_uniforms(seeds: Sequence[int], counters: Sequence[int], stream: int = 0) -> np.ndarray:
    """``counter_uniforms`` on a separate stream: float64 [N] uniforms from (seed, counter, stream)."""
    if stream:
        seeds = [(s * 0x9E3779B97F4A7C15 + stream) & _MASK64 for s in seeds]
    return counter_uniforms(seeds, counters)


# ------------------------------------------------------------------------------------ the rules


def draft_sample(
    subset_logits: torch.Tensor, params: SamplingBatch, uniforms: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample one draft token per row from q = softmax(filter(subset_logits / T)).

    subset_logits [M, Vs]; uniforms float64 [M]. Greedy rows take the argmax.
    Returns (subset rows [M], q [M, Vs] float32; None when every row is greedy).
    """
    greedy = subset_logits.argmax(dim=-1)
    if params.is_all_greedy:  # greedy acceptance compares ids only: q is never needed
        return greedy, None
    q = sampling_log_distribution(subset_logits, params.temperature, params.top_k, params.top_p).exp()
    sampled = inverse_cdf(q, uniforms)
    return torch.where(params.temperature.to(q.device) == 0, greedy, sampled), q


def accept_drafts(
    target_logprobs: torch.Tensor,
    target_argmax: torch.Tensor,
    draft_ids: torch.Tensor,
    draft_rows: torch.Tensor,
    draft_probs: torch.Tensor,
    subset_ids: torch.Tensor,
    num_drafts: torch.Tensor,
    is_greedy: torch.Tensor,
    accept_uniforms: torch.Tensor,
    sample_uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify one round of drafts per row; returns (num_accepted [N], next_token [N]).

    Shapes (N rows, K = max drafts, V vocabulary, Vs subset):
        target_logprobs [N, K+1, V]  log p_i, the target's sampling distributions
        target_argmax   [N, K+1]     argmax of the raw target logits (greedy rows)
        draft_ids       [N, K]       x_i as full ids;  draft_rows [N, K] their subset rows
        draft_probs     [N, K, Vs]   q_i over the subset
        subset_ids      [Vs]         full id of each subset row
        num_drafts      [N]          k_n <= K (positions past it are padding)
        is_greedy       [N] bool
        accept_uniforms [N, K], sample_uniforms [N, K+1]   float64 in [0, 1)

    Greedy rows accept x_i while x_i == argmax p_i and then emit argmax p_{n+1}. Sampling rows
    accept x_i iff u_i * q_i(x_i) < p_i(x_i) (probability min(1, p/q)); at the first rejection,
    position n, they emit y ~ norm(max(0, p_n - q_n)); when all k_n are accepted, y ~ p_{k_n+1}.
    """
    num_rows, max_drafts = draft_ids.shape
    rows = torch.arange(num_rows, device=draft_ids.device)
    if max_drafts:
        p_x = target_logprobs[:, :max_drafts].gather(-1, draft_ids[..., None]).squeeze(-1).exp().double()
        q_x = draft_probs.gather(-1, draft_rows[..., None]).squeeze(-1).double()
        sampled_ok = accept_uniforms.to(q_x.device) * q_x < p_x
        greedy_ok = draft_ids == target_argmax[:, :max_drafts]
        is_valid = torch.arange(max_drafts, device=draft_ids.device)[None, :] < num_drafts[:, None]
        accepted = torch.where(is_greedy[:, None], greedy_ok, sampled_ok) & is_valid
        num_accepted = accepted.long().cumprod(dim=-1).sum(dim=-1)  # [N] leading run of accepts
    else:
        num_accepted = torch.zeros(num_rows, dtype=torch.long, device=draft_ids.device)
    if bool(is_greedy.all()):
        return num_accepted, target_argmax[rows, num_accepted]
    p_next = target_logprobs[rows, num_accepted].exp()  # [N, V] target distribution at position n
    is_rejection = num_accepted < num_drafts
    if max_drafts and bool((is_rejection & ~is_greedy).any()):
        q_next = torch.zeros_like(p_next)
        q_next[:, subset_ids] = draft_probs[rows, num_accepted.clamp(max=max_drafts - 1)]
        residual = (p_next - q_next).clamp_(min=0)
        # p == q up to rounding: a rejection then has probability ~0, fall back to p itself
        has_mass = residual.sum(dim=-1, keepdim=True) > 0
        p_next = torch.where(is_rejection[:, None] & has_mass, residual, p_next)
    uniforms = sample_uniforms.to(p_next.device)[rows, num_accepted]
    sampled = inverse_cdf(p_next, uniforms)
    next_token = torch.where(is_greedy, target_argmax[rows, num_accepted], sampled)
    return num_accepted, next_token


# ------------------------------------------------------------------------------------ the draft


@dataclass
class Drafter:
    """A draft model (sharing the target's tokenizer) with its FR-Spec head and draft length k."""

    model: torch.nn.Module
    head: DraftHead
    num_draft_tokens: int

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        num_draft_tokens: int = 4,
        frspec_vocab: str | Path | None = None,
        *,
        dtype: torch.dtype | str = "auto",
        device: torch.device | str = "cpu",
        tokenizer: Any = None,
        keep_token_ids: Iterable[int] = (),
    ) -> Drafter:
        """Load a draft checkpoint; ``frspec_vocab`` (from `rlcpm freq`) restricts its head.

        The ranking must have been counted with ``tokenizer`` (checked when given); the subset
        always holds ``keep_token_ids`` (the engine passes its EOS ids).
        """
        from rlcpm.models import load_model
        from rlcpm.rollout.frspec import FrequencyRanking

        if num_draft_tokens <= 0:
            raise EngineError(f"speculative num_draft_tokens must be > 0, got {num_draft_tokens}")
        path = Path(path).expanduser()  # `~` as in model.path
        model = load_model(path, dtype=dtype, device=device)
        _check_same_tokenizer(path, tokenizer)
        subset = None
        if frspec_vocab is not None:
            subset = FrequencyRanking.load(frspec_vocab, tokenizer).subset_ids(keep_token_ids)
        return cls(model, DraftHead(model.lm_head.weight, subset), num_draft_tokens)

    def kv_block_bytes(self, block_size: int) -> int:
        config = self.model.config
        return PagedKVCache.block_bytes(
            config.num_hidden_layers,
            block_size,
            config.num_key_value_heads,
            config.head_dim,
            self.model.dtype,
        )

    def check_compatible(self, target: torch.nn.Module) -> None:
        if self.model.config.vocab_size != target.config.vocab_size:
            raise EngineError(
                f"the draft model's vocabulary has {self.model.config.vocab_size} ids, the target's "
                f"{target.config.vocab_size}: a draft must share the target's tokenizer and embedding size"
            )
        if self.model.device != target.device:
            raise EngineError(f"the draft model is on {self.model.device}, the target on {target.device}")

    def pack_linears(self) -> None:
        """CPU fast path: prepack the decoder's linears and the head (not the unused full head)."""
        pack_linear_layers(self.model.model)
        pack_linear_layers(self.head)


# ---------------------------------------------------------------------------------- the decoder


@dataclass
class _DraftProgress:
    kv_epoch: int
    draft_end: int  # draft KV written for positions < draft_end (valid up to num_computed_tokens)


def acceptance_stats(num_rounds: int, num_drafted: int, num_accepted: int) -> dict[str, float]:
    """spec_acceptance_len = 1 + accepted / rounds (tokens per target verification per sequence)
    and spec_acceptance_rate = accepted / drafted; 0 when nothing was drafted."""
    return {
        "spec_acceptance_len": 1 + num_accepted / num_rounds if num_rounds else 0.0,
        "spec_acceptance_rate": num_accepted / num_drafted if num_drafted else 0.0,
    }


class SpeculativeDecoder:
    """Runs one engine step with speculative decoding for the batch's decoding sequences.

    ``step(batch)`` returns, per sampling sequence (batch order), the tokens to append and
    their target log-probs; the scheduler's postprocess applies stop rules token by token and
    moves ``num_computed_tokens`` to the last appended token (the KV rollback).
    """

    def __init__(
        self, target: torch.nn.Module, target_cache: PagedKVCache, drafter: Drafter, max_model_len: int
    ):
        drafter.check_compatible(target)
        self.max_model_len = max_model_len
        self.target = target
        self.target_cache = target_cache
        self.drafter = drafter
        self.num_draft_tokens = drafter.num_draft_tokens
        self.block_size = target_cache.block_size
        self.draft_cache = drafter.model.new_kv_cache(target_cache.num_blocks, target_cache.block_size)
        self._progress: WeakKeyDictionary[Seq, _DraftProgress] = WeakKeyDictionary()
        self.stats = {
            "spec_num_rounds": 0,
            "spec_draft_tokens": 0,
            "spec_accepted_tokens": 0,
            "spec_draft_seconds": 0.0,
            "spec_verify_seconds": 0.0,
        }

    def engine_stats(self) -> dict[str, float]:
        return {
            **self.stats,
            **acceptance_stats(
                self.stats["spec_num_rounds"],
                self.stats["spec_draft_tokens"],
                self.stats["spec_accepted_tokens"],
            ),
            "spec_draft_head_tokens": self.drafter.head.num_tokens,
        }

    # ------------------------------------------------------------------------------- a step

    @torch.inference_mode()
    def step(self, batch: ScheduledBatch) -> tuple[list[list[int]], list[list[float]]]:
        # every sequence that samples this step (a decode, or a prefill reaching its last
        # token) runs a round; prefill chunks that do not sample just go through both models
        is_sampling = [batch.is_sampling(i) for i in range(len(batch.seqs))]
        sampling = [seq for seq, flag in zip(batch.seqs, is_sampling) if flag]
        num_drafts = [self._num_drafts(seq) for seq in sampling]

        start = time.perf_counter()
        draft_ids, draft_rows, draft_probs = self._draft(batch, is_sampling, num_drafts)
        self.stats["spec_draft_seconds"] += time.perf_counter() - start

        start = time.perf_counter()
        hidden = self._verify_forward(batch, is_sampling, draft_ids, num_drafts)
        tokens: list[list[int]] = []
        logprobs: list[list[float]] = []
        if sampling:
            tokens, logprobs = self._accept(sampling, num_drafts, draft_ids, draft_rows, draft_probs, hidden)
        self.stats["spec_verify_seconds"] += time.perf_counter() - start
        return tokens, logprobs

    def _num_drafts(self, seq: Seq) -> int:
        """k for this round: at most num_draft_tokens, and never past the request's remaining
        budget (max_new_tokens, chunk, context) or the KV slots the scheduler reserved."""
        remaining = seq.params.max_new_tokens - seq.num_generated
        if seq.chunk_budget is not None:
            remaining = min(remaining, seq.chunk_budget)
        remaining = min(remaining, self.max_model_len - len(seq) + 1)
        reserved = len(seq.block_table) * self.block_size
        return max(0, min(self.num_draft_tokens, remaining - 1, reserved - len(seq)))

    def _draft_start(self, seq: Seq) -> int:
        """First position whose draft KV is missing (draft and target share block ids)."""
        progress = self._progress.get(seq)
        if progress is None or progress.kv_epoch != seq.kv_epoch:
            return seq.num_computed_tokens  # new or re-admitted: prefilled in lockstep from here
        return min(progress.draft_end, seq.num_computed_tokens)

    def _draft(self, batch: ScheduledBatch, is_sampling: list[bool], num_drafts: list[int]):
        """Chain drafting. Draft forward 1 takes every scheduled sequence's missing tokens (the
        prefill chunks, the pending token, a lagging x_k); forwards 2..k feed x_{i-1} back.
        Returns draft ids [N, K] (full ids), their subset rows [N, K] and q [N, K, Vs]."""
        head = self.drafter.head
        max_drafts = max(num_drafts, default=0)
        starts = [self._draft_start(seq) for seq in batch.seqs]
        ends = [seq.num_computed_tokens + n for seq, n in zip(batch.seqs, batch.num_query_tokens)]
        hidden = self._forward(
            self.drafter.model,
            self.draft_cache,
            batch.seqs,
            starts,
            [s.token_ids[a:b] for s, a, b in zip(batch.seqs, starts, ends)],
        )
        last_rows = torch.tensor(ends, dtype=torch.long).sub_(torch.tensor(starts)).cumsum(0).sub_(1)
        batch_index = [i for i, flag in enumerate(is_sampling) if flag]
        drafts_of = dict(zip(batch_index, num_drafts))
        for index, (seq, end) in enumerate(zip(batch.seqs, ends)):
            self._progress[seq] = _DraftProgress(seq.kv_epoch, end + max(drafts_of.get(index, 0) - 1, 0))
        decodes = [batch.seqs[i] for i in batch_index]
        num_rows = len(decodes)
        draft_ids = torch.zeros(num_rows, max_drafts, dtype=torch.long, device=hidden.device)
        draft_rows = torch.zeros_like(draft_ids)
        draft_probs = hidden.new_zeros(num_rows, max_drafts, head.num_tokens, dtype=torch.float32)
        if max_drafts == 0:
            return draft_ids, draft_rows, draft_probs
        drafting = [i for i, n in enumerate(num_drafts) if n > 0]
        h = hidden[last_rows[[batch_index[i] for i in drafting]].to(hidden.device)]
        for step in range(max_drafts):
            rows = torch.tensor(drafting, dtype=torch.long, device=hidden.device)
            seqs = [decodes[i] for i in drafting]
            params = SamplingBatch.from_params(
                [s.params for s in seqs], [s.seed for s in seqs], [s.num_generated + step for s in seqs]
            )
            uniforms = None
            if not params.is_all_greedy:
                uniforms = torch.from_numpy(stream_uniforms(params.seeds, params.counters, _DRAFT_STREAM))
            sub, q = draft_sample(head(h), params, uniforms)
            draft_rows[rows, step] = sub
            draft_ids[rows, step] = head.to_full_ids(sub)
            if q is not None:
                draft_probs[rows, step] = q
            drafting = [i for i in drafting if num_drafts[i] > step + 1]
            if not drafting:
                break
            seqs = [decodes[i] for i in drafting]
            tokens = draft_ids[drafting, step].tolist()
            h = self._forward(
                self.drafter.model,
                self.draft_cache,
                seqs,
                [len(s) + step for s in seqs],
                [[t] for t in tokens],
            )
        return draft_ids, draft_rows, draft_probs

    def _verify_forward(self, batch: ScheduledBatch, is_sampling: list[bool], draft_ids, num_drafts):
        """ONE target forward over every scheduled sequence's new tokens, the drafts of the
        sampling ones appended: [.., pending, x_1 .. x_k]. Returns the hidden states at
        pending, x_1 .. x_K of each sampling sequence, [N, K+1, H] (rows past its k_n repeat
        its last one)."""
        starts, token_lists, verify_rows = [], [], []
        num_tokens = 0
        sample_number = 0
        for index, seq in enumerate(batch.seqs):
            start = seq.num_computed_tokens
            tokens = seq.token_ids[start : start + batch.num_query_tokens[index]]
            if is_sampling[index]:
                k = num_drafts[sample_number]
                tokens = tokens + draft_ids[sample_number, :k].tolist()
                pending = num_tokens + len(tokens) - 1 - k
                verify_rows.append([pending + min(i, k) for i in range(draft_ids.shape[1] + 1)])
                sample_number += 1
            starts.append(start)
            token_lists.append(tokens)
            num_tokens += len(tokens)
        hidden = self._forward(self.target, self.target_cache, batch.seqs, starts, token_lists)
        if not verify_rows:
            return hidden.new_zeros(0, draft_ids.shape[1] + 1, hidden.shape[-1])
        return hidden[torch.tensor(verify_rows, dtype=torch.long, device=hidden.device)]

    def _accept(self, decodes, num_drafts, draft_ids, draft_rows, draft_probs, hidden):
        """Target distributions at the verified positions -> accepted tokens and their log-probs."""
        params = SamplingBatch.from_params(
            [s.params for s in decodes], [s.seed for s in decodes], [s.num_generated for s in decodes]
        )
        num_rows, width, _ = hidden.shape
        logits = self.target.compute_logits(hidden)  # [N, K+1, V]
        log_p = sampling_log_distribution(
            logits.flatten(0, 1),
            params.temperature.repeat_interleave(width),
            params.top_k.repeat_interleave(width),
            params.top_p.repeat_interleave(width),
        ).view(num_rows, width, -1)  # log p_i at the K+1 verified positions
        flat_seeds = [s.seed for s in decodes for _ in range(width)]
        flat_counters = [s.num_generated + i for s in decodes for i in range(width)]  # token index t
        accept_u = stream_uniforms(flat_seeds, flat_counters, _ACCEPT_STREAM).reshape(num_rows, width)
        sample_u = stream_uniforms(flat_seeds, flat_counters).reshape(num_rows, width)
        k = torch.tensor(num_drafts, dtype=torch.long, device=logits.device)
        num_accepted, next_token = accept_drafts(
            log_p,
            logits.argmax(dim=-1),
            draft_ids,
            draft_rows,
            draft_probs,
            self.drafter.head.subset_ids,
            k,
            params.temperature.to(logits.device) == 0,
            torch.from_numpy(accept_u[:, :-1]),
            torch.from_numpy(sample_u),
        )
        emitted = torch.cat([draft_ids, next_token[:, None]], dim=1)  # [N, K+1]
        emitted[torch.arange(num_rows), num_accepted] = next_token
        emitted_logprobs = log_p.gather(-1, emitted[..., None]).squeeze(-1)
        lengths = (num_accepted + 1).tolist()
        tokens = [row[:n] for row, n in zip(emitted.tolist(), lengths)]
        logprobs = [row[:n] for row, n in zip(emitted_logprobs.tolist(), lengths)]
        self.stats["spec_num_rounds"] += sum(1 for n in num_drafts if n > 0)
        self.stats["spec_draft_tokens"] += sum(num_drafts)
        self.stats["spec_accepted_tokens"] += int(num_accepted.sum())
        return tokens, logprobs

    # ---------------------------------------------------------------------------- forwards

    def _forward(self, model, cache: PagedKVCache, seqs, starts: list[int], token_lists: list[list[int]]):
        """Paged forward of new tokens at positions start.. of each sequence: hidden [T, H].

        The metadata is built in Python (as the model runner does): a draft step is a tiny
        forward, so per-call tensor bookkeeping would cost as much as the model itself."""
        block_size = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        cu_seqlens = [0]
        for seq, start, tokens in zip(seqs, starts, token_lists):
            end = start + len(tokens)
            table = seq.block_table
            ids += tokens
            positions += range(start, end)
            slots += [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
            context_lens.append(end)
            cu_seqlens.append(cu_seqlens[-1] + len(tokens))
        width = max(len(seq.block_table) for seq in seqs)
        device = cache.device
        meta = AttentionMetadata(
            cu_seqlens_q=torch.tensor(cu_seqlens, dtype=torch.int32, device=device),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(
                [seq.block_table + [0] * (width - len(seq.block_table)) for seq in seqs],
                dtype=torch.int32,
                device=device,
            ),
            max_seqlen_q=max(len(tokens) for tokens in token_lists),
            max_context_len=max(context_lens),
        )
        return model(
            torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(positions, dtype=torch.long, device=device),
            meta=meta,
            kv_cache=cache,
            return_hidden=True,
        )


def _check_same_tokenizer(draft_dir: str | Path, tokenizer: Any) -> None:
    """EngineError when the draft directory ships a tokenizer other than the target's: its ids
    would mean other tokens, and acceptance would collapse without an error."""
    if tokenizer is None or not (Path(draft_dir) / "tokenizer.json").is_file():
        return
    from rlcpm.models import load_tokenizer
    from rlcpm.rollout.frspec import tokenizer_fingerprint

    if tokenizer_fingerprint(load_tokenizer(draft_dir)) != tokenizer_fingerprint(tokenizer):
        raise EngineError(
            f"the draft model {draft_dir} has another tokenizer than the target (its token ids mean "
            "other tokens): a draft must share the target's tokenizer"
        )
