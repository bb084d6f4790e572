"""Metrics of one training step, accumulated over micro-batches and reduced over ranks.

Loss-function stats are means over a micro-batch's tokens (or pairs); they are recombined as
weighted means (weight: the `num_tokens` / `num_pairs` the stats report), `*_max` as maxima.
Micro-batch losses already carry the batch's global denominator, so they SUM to the step loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlcpm.learner.distributed import all_gather_objects

COUNT_KEYS = ("num_tokens", "num_pairs")


@dataclass
class UpdateStats:
    """One optimizer update on one rank."""

    loss: float = 0.0
    sums: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    maxes: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)  # the same on every rank (grad_norm, lr)
    elapsed_s: float = 0.0

    def absorb(self, other: UpdateStats) -> None:
        """Fold another rank's share of the same update into this one."""
        self.loss += other.loss
        for target, source in (
            (self.sums, other.sums),
            (self.weights, other.weights),
            (self.counts, other.counts),
        ):
            for key, value in source.items():
                target[key] = target.get(key, 0.0) + value
        for key, value in other.maxes.items():
            self.maxes[key] = max(self.maxes.get(key, value), value)
        self.elapsed_s = max(self.elapsed_s, other.elapsed_s)


class StepStats:
    """Accumulates micro-batch results of one or more optimizer updates (mini-batches)."""

    def __init__(self) -> None:
        self.updates: list[UpdateStats] = []

    @property
    def current(self) -> UpdateStats:
        if not self.updates:
            self.updates.append(UpdateStats())
        return self.updates[-1]

    @property
    def elapsed_s(self) -> float:
        return self.current.elapsed_s

    @elapsed_s.setter
    def elapsed_s(self, value: float) -> None:
        self.current.elapsed_s = value

    def add(self, loss: float, stats: dict, num_tokens: int) -> None:
        update = self.current
        update.loss += loss
        weight = float(next((stats[k] for k in COUNT_KEYS if k in stats), 1.0))
        update.counts["scored_tokens"] = update.counts.get("scored_tokens", 0.0) + num_tokens
        for key, value in stats.items():
            value = float(value)
            if key in COUNT_KEYS:
                update.counts[key] = update.counts.get(key, 0.0) + value
            elif key.endswith("_max"):
                update.maxes[key] = max(update.maxes.get(key, value), value)
            else:
                update.sums[key] = update.sums.get(key, 0.0) + value * weight
                update.weights[key] = update.weights.get(key, 0.0) + weight

    def set(self, key: str, value: float) -> None:
        self.current.scalars[key] = float(value)

    def merge(self, other: StepStats) -> None:
        self.updates.extend(other.updates)

    def reduce(self) -> dict[str, float]:
        """Combine ranks (a collective), then average updates: `train/*` and `perf/*` metrics."""
        per_rank = all_gather_objects(self.updates)
        updates = per_rank[0]
        for rank_updates in per_rank[1:]:
            for update, other in zip(updates, rank_updates):
                update.absorb(other)
        if not updates:
            return {}
        n = len(updates)
        metrics = {"train/loss": sum(u.loss for u in updates) / n, "train/num_updates": float(n)}
        for key in updates[0].sums:
            values = [u.sums[key] / u.weights[key] for u in updates if u.weights.get(key)]
            if values:
                metrics[f"train/{key}"] = sum(values) / len(values)
        for key in {k for u in updates for k in u.maxes}:
            metrics[f"train/{key}"] = max(u.maxes[key] for u in updates if key in u.maxes)
        for key in {k for u in updates for k in u.counts}:
            metrics[f"train/{key}"] = sum(u.counts.get(key, 0.0) for u in updates)
        for key in {k for u in updates for k in u.scalars}:
            values = [u.scalars[key] for u in updates if key in u.scalars]
            metrics[f"train/{key}"] = sum(values) / len(values)
        elapsed = sum(u.elapsed_s for u in updates)
        metrics["perf/learner_step_s"] = elapsed
        if elapsed > 0:
            metrics["perf/learner_tokens_per_s"] = metrics.get("train/scored_tokens", 0.0) / elapsed
        return metrics
