"""Reward metrics for a step's log (`reward/*`), from the results of one batch."""

from __future__ import annotations

from collections.abc import Sequence

from rlcpm.rewards.combined import RewardResult


def summarize(results: Sequence[RewardResult]) -> dict[str, float]:
    """Means of the total and of every component, plus error and drop counts.

    Keys: reward/total_mean, reward/total_std, reward/<component>_mean, reward/num_errors,
    reward/num_dropped. Components are averaged over the samples that have them.
    """
    if not results:
        return {}
    totals = [r.total for r in results]
    mean = sum(totals) / len(totals)
    metrics = {
        "reward/total_mean": mean,
        "reward/total_std": (sum((t - mean) ** 2 for t in totals) / len(totals)) ** 0.5,
        "reward/num_errors": float(sum(r.error is not None for r in results)),
        "reward/num_dropped": float(sum(r.dropped for r in results)),
    }
    sums: dict[str, list[float]] = {}
    for result in results:
        for name, value in result.components.items():
            sums.setdefault(name, []).append(value)
    for name, values in sums.items():
        metrics[f"reward/{name}_mean"] = sum(values) / len(values)
    return metrics
