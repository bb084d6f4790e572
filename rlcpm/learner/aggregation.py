"""Loss aggregation with a GLOBAL denominator, so gradient accumulation is exact.

A batch is split into micro-batches (whole sequences each). Each micro-batch's loss divides by
the denominator of the WHOLE batch, so the sum of the micro-batch losses equals the loss of the
batch in one piece (and so do the gradients):

    token-mean           L = sum_i sum_t m_it l_it / sum_i sum_t m_it          (DAPO token-level)
    seq-mean-token-mean  L = (1 / N) sum_i [ sum_t m_it l_it / sum_t m_it ]    (GRPO paper)
    seq-mean-token-sum   L = (1 / N) sum_i sum_t m_it l_it

with m the loss mask [B, T] and N the number of sequences that have at least one loss token.
Pass `num_tokens` (token-mean) / `num_sequences` (seq-mean-*) computed over the whole batch;
left as None they are computed from this call's mask (one micro-batch == the batch).
"""

from __future__ import annotations

import torch

from rlcpm.errors import TrainingError

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def batch_denominators(mask: torch.Tensor) -> tuple[int, int]:
    """(num_tokens, num_sequences) of a loss mask [B, T]: the global denominators of a batch."""
    per_sequence = mask.sum(dim=-1)
    return int(per_sequence.sum().item()), int((per_sequence > 0).sum().item())


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token-mean",
    *,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
) -> torch.Tensor:
    """Reduce per-token losses [B, T] under `mask` [B, T] to a scalar (see the module docstring)."""
    mask = mask.to(per_token_loss.dtype)
    masked = torch.where(mask > 0, per_token_loss * mask, 0.0)  # [B, T]; garbage outside the mask stays out
    if agg == "token-mean":
        denominator = mask.sum() if num_tokens is None else num_tokens
        return masked.sum() / max(float(denominator), 1.0)
    if agg not in LOSS_AGGREGATIONS:
        raise TrainingError(f"unknown loss aggregation {agg!r}; choose one of {list(LOSS_AGGREGATIONS)}")
    tokens_per_sequence = mask.sum(dim=-1)  # [B]
    if num_sequences is None:
        num_sequences = float((tokens_per_sequence > 0).sum())
    sequence_loss = masked.sum(dim=-1)  # [B]
    if agg == "seq-mean-token-mean":
        sequence_loss = sequence_loss / tokens_per_sequence.clamp(min=1.0)
    return sequence_loss.sum() / max(float(num_sequences), 1.0)
