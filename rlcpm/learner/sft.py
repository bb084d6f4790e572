"""Supervised fine-tuning loss: cross-entropy on response tokens only (the prompt is masked).

    L = -(1 / N) sum_i sum_{t in response(i)} log pi_theta(y_t | y_<t)

with N the number of response tokens in the WHOLE batch (`num_tokens`, for exact gradient
accumulation over micro-batches); left as None it is this call's count.
"""

from __future__ import annotations

import torch


def sft_loss(
    logprobs: torch.Tensor, mask: torch.Tensor, *, num_tokens: float | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative log-likelihood of the target tokens.

    Args:
        logprobs: [N] or [B, T] log pi_theta of each target token (its next-token prediction).
        mask: same shape, 1 on response tokens, 0 on prompt and padding.
        num_tokens: the batch's total response-token count (micro-batching).

    Returns:
        (loss, stats) with stats nll (mean over this call's tokens) and num_tokens.
    """
    weight = (mask > 0).to(logprobs.dtype)
    nll = -torch.where(weight > 0, logprobs, 0.0)  # padding may hold -inf
    local_tokens = weight.sum()
    denominator = local_tokens.item() if num_tokens is None else num_tokens
    loss = nll.sum() / max(float(denominator), 1.0)
    stats = {
        "nll": (nll.sum() / local_tokens.clamp(min=1.0)).detach().float(),
        "num_tokens": local_tokens.detach(),
    }
    return loss, stats
