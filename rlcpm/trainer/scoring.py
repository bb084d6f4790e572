"""Finished groups -> rewards -> filters: what enters the training buffer, and the reward metrics."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch

from rlcpm.config import GRPOConfig, RolloutConfig
from rlcpm.rewards import RewardResult, Sample, is_repetitive, overlong_penalty, summarize
from rlcpm.trainer.filters import has_signal, is_binary, response_loss_mask
from rlcpm.trainer.trajectory import Group

CORRECT_THRESHOLD = 0.5


def to_samples(group: Group, decode) -> list[Sample]:
    """What the rewards see of a group's responses. Ids are `<example id>/<trajectory id>`: a
    reward's error leads to the dataset row, and each response of each draw has its own id."""
    ex = group.example
    return [
        Sample(
            id=f"{ex.id}/{traj.traj_id}",
            prompt=ex.prompt,
            response=decode(traj.response_token_ids),
            messages=ex.messages,
            prompt_token_ids=list(traj.prompt_token_ids),
            response_token_ids=list(traj.response_token_ids),
            answer=ex.answer,
            fields=dict(ex.fields),
            finish_reason=traj.finish_reason,
        )
        for traj in group.trajectories
    ]


def attach_rewards(
    group: Group, results: Sequence[RewardResult], algo: GRPOConfig, rollout: RolloutConfig
) -> None:
    """Fill group.rewards / scores / reward_components / dropped / loss_mask. A dropped sample
    (reward on_error: drop) gets the group's mean reward (for the metrics) and zero loss weight;
    the advantages of its group are computed over the kept samples (rl_loop.group_advantages)."""
    totals = group.scores = [r.total for r in results]
    if algo.overlong_penalty is not None:
        cfg = algo.overlong_penalty
        totals = [
            t
            + overlong_penalty(
                len(traj.response_token_ids), rollout.max_new_tokens, cfg.buffer_tokens, cfg.penalty
            )
            for t, traj in zip(totals, group.trajectories)
        ]
    dropped = [r.dropped for r in results]
    kept = [t for t, d in zip(totals, dropped) if not d]
    fill = statistics.fmean(kept) if kept else 0.0
    group.rewards = [fill if d else t for t, d in zip(totals, dropped)]
    group.reward_components = [dict(r.components) for r in results]
    group.dropped = dropped
    repetition = None
    if algo.repetition_filter is not None:
        rf = algo.repetition_filter
        repetition = lambda ids: is_repetitive(ids, rf.ngram, rf.max_repeat_fraction)  # noqa: E731
    group.loss_mask = response_loss_mask(group, overlong_filter=algo.overlong_filter, repetition=repetition)


def passes_dynamic_sampling(group: Group) -> bool:
    """0 < #correct < G (binary rewards) or reward std > 0, over the samples that were not dropped.

    Judges the rewards before algorithm.overlong_penalty (DAPO filters on accuracy): a group of
    correct answers whose lengths differ within the penalty's buffer has no signal, only a
    length penalty to train on. Judged in float32, the precision the advantages are computed in
    (GRPOTrainer.train_step): rewards that differ in float64 only (0.1 + 0.2 and 0.3) would pass
    with all-zero advantages."""
    scores = group.scores if group.scores is not None else group.rewards
    kept = [r for r, d in zip(scores or [], group.dropped or []) if not d]
    rewards = torch.tensor(kept, dtype=torch.float32).tolist()
    return has_signal(rewards, binary=is_binary(rewards))


def is_correct(components: dict[str, float], first_label: str) -> bool:
    """Accuracy counts a response as correct when the recipe's first reward gives it >= 0.5."""
    return components.get(first_label, 0.0) >= CORRECT_THRESHOLD


def reward_metrics(results: Sequence[RewardResult], labels: Sequence[str], prefix: str = "reward") -> dict:
    """Means per component (from rlcpm.rewards.summarize) plus accuracy per component and overall."""
    metrics = summarize(results)
    if prefix != "reward":
        metrics = {prefix + k.removeprefix("reward"): v for k, v in metrics.items()}
    kept = [r for r in results if not r.dropped]
    if not kept:
        return metrics
    for label in labels:
        values = [r.components.get(label, 0.0) for r in kept]
        metrics[f"{prefix}/{label}_accuracy"] = sum(v >= CORRECT_THRESHOLD for v in values) / len(values)
    metrics[f"{prefix}/accuracy"] = metrics[f"{prefix}/{labels[0]}_accuracy"]  # the headline accuracy
    return metrics
