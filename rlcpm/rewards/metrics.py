"""Reward metrics for a step's log (`reward/*`), from the results of one batch."""

from __future__ import annotations

from collections.abc import Sequence

from rlcpm.rewards.combined import RewardResult


def summarize(results: Sequence[RewardResult]) -> dict[str, float]:
    """Means of the total and of every component, plus error and drop counts.

    Keys: reward/total_mean, reward/total_std, reward/<component>_mean, reward/num_errors,
    reward/num_dropped. Means leave out dropped samples (on_error: drop), which train on nothing;
    components are averaged over the samples that have them.
    """
    if not results:
        return {}
    kept = [r for r in results if not r.dropped]
    totals = [r.total for r in kept]
    mean = sum(totals) / len(totals) if totals else 0.0
    metrics = {
        "reward/total_mean": mean,
        "reward/total_std": (sum((t - mean) ** 2 for t in totals) / len(totals)) ** 0.5 if totals else 0.0,
        "reward/num_errors": float(sum(r.error is not None for r in results)),
        "reward/num_dropped": float(len(results) - len(kept)),
    }
    sums: dict[str, list[float]] = {}
    for result in kept:
        for name, value in result.components.items():
            sums.setdefault(name, []).append(value)
    for name, values in sums.items():
        metrics[f"reward/{name}_mean"] = sum(values) / len(values)
    return metrics
