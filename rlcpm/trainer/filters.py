"""Which finished groups and responses train: dynamic sampling, overlong and repetition filters (SPECS §1)."""

from __future__ import annotations

import statistics
from collections.abc import Callable

from rlcpm.trainer.trajectory import Group


def has_signal(rewards: list[float], binary: bool) -> bool:
    """Dynamic sampling: keep a group only if 0 < #correct < G (binary rewards) or the reward std > 0."""
    if binary:
        num_correct = sum(r > 0.5 for r in rewards)
        return 0 < num_correct < len(rewards)
    return len(rewards) > 1 and statistics.pstdev(rewards) > 0


def is_binary(rewards: list[float]) -> bool:
    return all(r in (0.0, 1.0) for r in rewards)


def response_loss_mask(
    group: Group,
    *,
    overlong_filter: bool,
    repetition: Callable[[list[int]], bool] | None = None,
) -> list[bool]:
    """False for responses that carry zero loss weight: cut by the global max length (overlong
    filtering), or too repetitive to learn from (when a repetition check is given)."""
    mask = []
    for traj in group.trajectories:
        keep = not (overlong_filter and traj.finish_reason == "length")
        if keep and repetition is not None and repetition(traj.response_token_ids):
            keep = False
        mask.append(keep)
    return mask
