"""DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13)."""

from __future__ import annotations

from rlcpm.errors import RewardError


def overlong_penalty(num_tokens: int, max_tokens: int, buffer_tokens: int, penalty: float = 1.0) -> float:
    """A length-aware penalty, added to the task reward.

        R(|y|) = 0                                   if |y| <= L_max - L_cache
               = ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max
               = -1                                  if |y| > L_max
    times `penalty`, with L_max = `max_tokens` and L_cache = `buffer_tokens`.
    """
    if buffer_tokens <= 0 or buffer_tokens > max_tokens:
        raise RewardError(
            f"overlong penalty: buffer_tokens must be in (0, max_tokens={max_tokens}], got {buffer_tokens}"
        )
    soft_limit = max_tokens - buffer_tokens
    if num_tokens <= soft_limit:
        return 0.0
    if num_tokens > max_tokens:
        return -penalty
    return penalty * (soft_limit - num_tokens) / buffer_tokens
