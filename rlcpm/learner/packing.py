"""Packed micro-batches by token budget (no padding) and the split of a batch across ranks.

A micro-batch concatenates whole sequences into one 1-D stream with positions restarting at 0
per sequence and `cu_seqlens` offsets (the model's packed forward, rlcpm.models.AttentionMetadata).
Sequence s = prompt + response enters as `(prompt + response)[:-1]`: the hidden state at index
j predicts token j + 1, so response token t (absolute index P + t) is scored at index P + t - 1.
Only those rows ever reach the LM head.

    input_ids    [T]   packed tokens             positions [T]   restart per sequence
    score_index  [N]   rows of the stream that predict a response token
    targets      [N]   the response tokens they predict
    row, col     [N]   where each scored token sits in the [S, R_max] layout of the loss

Shared prompts (`share_prompts=True`): consecutive sequences with the same prompt (the G
responses of a GRPO group, a DPO pair) store it once. The stream then holds segments: the
prompt (all P tokens), and for each response its `response[:-1]` as a continuation that sees
the whole prompt (AttentionMetadata.prefix_seq) with positions P, P + 1, ...; response token 0
is scored at the prompt's last row, shared by all of them. Same log-probs and gradients (to
rounding) for G - 1 fewer copies of the prompt in the forward and backward passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlcpm.errors import TrainingError


@dataclass
class PackedMicroBatch:
    """One packed forward's worth of sequences (see the module docstring for the layout)."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    seq_lens: list[int]  # lengths of the packed segments, summing to T (one per sequence unless shared)
    score_index: torch.Tensor  # [N] int64
    targets: torch.Tensor  # [N] int64
    row: torch.Tensor  # [N] int64 in [0, S)
    col: torch.Tensor  # [N] int64 in [0, R_max)
    sequence_ids: list[int]  # index in the batch of each of the S sequences
    max_response_len: int
    is_placeholder: bool = False  # a rank's filler pass (see placeholder_micro_batch)
    segment_prefix: list[int] | None = None  # per segment, its shared prompt segment (-1: none)

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to_padded(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Scatter per-scored-token values [N] into the loss layout [S, R_max] (fill elsewhere)."""
        out = values.new_full((self.num_sequences, self.max_response_len), fill)
        return out.index_put((self.row, self.col), values)

    def response_mask(self) -> torch.Tensor:
        """[S, R_max] float32, 1 on real response tokens."""
        return self.to_padded(torch.ones(self.targets.shape, dtype=torch.float32))

    def gather(self, per_sequence: Sequence[Sequence[float]], dtype=torch.float32) -> torch.Tensor:
        """Per-response-token values of this micro-batch's sequences (lists indexed like the batch) as [S, R_max]."""
        flat = [float(v) for s in self.sequence_ids for v in per_sequence[s]]
        return self.to_padded(torch.tensor(flat, dtype=dtype))

    def to(self, device: torch.device | str) -> PackedMicroBatch:
        tensors = {
            name: getattr(self, name).to(device)
            for name in ("input_ids", "positions", "score_index", "targets", "row", "col")
        }
        return PackedMicroBatch(
            **tensors,
            seq_lens=self.seq_lens,
            sequence_ids=self.sequence_ids,
            max_response_len=self.max_response_len,
            is_placeholder=self.is_placeholder,
            segment_prefix=self.segment_prefix,
        )


def pack_micro_batch(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    sequence_ids: Sequence[int],
    share_prompts: bool = False,
) -> PackedMicroBatch:
    """Pack the sequences `sequence_ids` (indices into prompts/responses) into one stream;
    with `share_prompts`, runs of consecutive sequences with the same prompt store it once."""
    input_ids, positions, score_index, targets, rows, cols, seq_lens = [], [], [], [], [], [], []
    segment_prefix: list[int] = []

    def add_segment(tokens: list[int], first_position: int, prefix: int) -> int:
        """Append a segment; returns the stream row of its first token."""
        start = len(input_ids)
        input_ids.extend(tokens)
        positions.extend(range(first_position, first_position + len(tokens)))
        seq_lens.append(len(tokens))
        segment_prefix.append(prefix)
        return start

    shared = None  # (prompt, its segment index, its first row) while a run of one prompt lasts
    for row, s in enumerate(sequence_ids):
        prompt, response = list(prompts[s]), list(responses[s])
        if not prompt or not response:
            raise TrainingError(f"sequence {s}: packing needs a non-empty prompt and response")
        next_prompt = list(prompts[sequence_ids[row + 1]]) if row + 1 < len(sequence_ids) else None
        if shared is not None and shared[0] != prompt:
            shared = None
        if shared is None and share_prompts and next_prompt == prompt:
            shared = (prompt, len(seq_lens), add_segment(prompt, 0, -1))
        if shared is None:  # prompt + response[:-1] as one sequence
            start = add_segment((prompt + response)[:-1], 0, -1)
            first_scores = range(start + len(prompt) - 1, start + len(prompt) - 1 + len(response))
        else:  # response[:-1] continuing the shared prompt; token 0 is scored at its last row
            _, prompt_segment, prompt_start = shared
            own = response[:-1]
            start = add_segment(own, len(prompt), prompt_segment) if own else len(input_ids)
            first_scores = [prompt_start + len(prompt) - 1, *range(start, start + len(own))]
        score_index.extend(first_scores)
        targets.extend(response)
        rows.extend([row] * len(response))
        cols.extend(range(len(response)))
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)
    return PackedMicroBatch(
        input_ids=as_long(input_ids),
        positions=as_long(positions),
        seq_lens=seq_lens,
        score_index=as_long(score_index),
        targets=as_long(targets),
        row=as_long(rows),
        col=as_long(cols),
        sequence_ids=list(sequence_ids),
        max_response_len=max(len(responses[s]) for s in sequence_ids),
        segment_prefix=segment_prefix if any(p >= 0 for p in segment_prefix) else None,
    )


def split_by_token_budget(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Group indices, in order, into runs of at most `budget` tokens (a longer one stands alone).

    Sequences of length 0 (nothing to score) are left out.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, length in enumerate(lengths):
        if length == 0:
            continue
        if current and used + length > budget:
            groups.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    if current:
        groups.append(current)
    return groups


def shard_across_ranks(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Balance sequences over ranks by tokens (longest first, to the least-loaded rank; deterministic).

    Returns one sorted index list per rank.
    """
    loads = [0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shards[rank].append(index)
        loads[rank] += lengths[index]
    return [sorted(shard) for shard in shards]


def plan_micro_batches(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    budget: int,
    *,
    units: Sequence[Sequence[int]] | None = None,
    rank: int = 0,
    world_size: int = 1,
    share_prompts: bool = False,
) -> list[PackedMicroBatch]:
    """This rank's packed micro-batches of at most `budget` tokens.

    `units` groups sequence indices that must share a micro-batch (a DPO pair: its loss couples
    both responses); by default each sequence with a non-empty response is its own unit, and
    units with nothing to score are left out. Units are balanced over ranks by tokens
    (shard_across_ranks), then packed in order. `share_prompts` packs each micro-batch with
    shared prompts (pack_micro_batch); the budget still counts every prompt, so a micro-batch
    then holds fewer tokens than it.
    """
    if units is None:
        units = [[i] for i in range(len(prompts)) if responses[i]]
    unit_lengths = [sum(len(prompts[i]) + len(responses[i]) - 1 for i in unit) for unit in units]
    mine = shard_across_ranks(unit_lengths, world_size)[rank]
    micro_batches = []
    for group in split_by_token_budget([unit_lengths[u] for u in mine], budget):
        sequence_ids = [i for j in group for i in units[mine[j]]]
        micro_batches.append(pack_micro_batch(prompts, responses, sequence_ids, share_prompts))
    return micro_batches


def placeholder_micro_batch() -> PackedMicroBatch:
    """One token scoring one token: what a rank with no work left runs so that every rank makes
    the same number of forward/backward passes (FSDP2's collectives must match); zero loss."""
    placeholder = pack_micro_batch([[0]], [[0]], [0])
    placeholder.is_placeholder = True
    placeholder.sequence_ids = []
    return placeholder
