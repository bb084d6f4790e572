"""Group-relative advantage estimators (SPECS §1, step 7).

Each estimator maps the scalar rewards of prompt groups, `rewards [num_groups, G]` (G samples of
one prompt per row), to one advantage per response of the same shape; the learner broadcasts
A_i to every token of o_i.

    grpo     A_i = (R_i - mean_G R) / (std_G R + eps)     DeepSeekMath (arXiv 2402.03300); std is
                                                          the unbiased (Bessel) sample std, as in TRL
    dr_grpo  A_i = R_i - mean_G R                         Dr. GRPO (arXiv 2503.20783): no std division
    rloo     A_i = R_i - mean_{j != i} R_j                REINFORCE leave-one-out (arXiv 2402.14740)
             = G / (G - 1) * (R_i - mean_G R)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlcpm.errors import TrainingError
from rlcpm.learner.kl import kl_estimate


def grpo_advantages(rewards: torch.Tensor, std_eps: float = 1e-6) -> torch.Tensor:
    """(R - mean_G) / (std_G + eps) per group; a group of identical rewards gets all zeros.

    Rounding could otherwise leave such a group a mean and a std that differ from R and 0 by
    ~1e-8, whose ratio is far from 0 (float32 0.7 x 8: +0.056 for every member)."""
    centered = rewards - rewards.mean(dim=-1, keepdim=True)  # [num_groups, G]
    std = rewards.std(dim=-1, keepdim=True, unbiased=True) if rewards.shape[-1] > 1 else 0.0
    identical = (rewards == rewards[..., :1]).all(dim=-1, keepdim=True)
    return torch.where(identical, 0.0, centered / (std + std_eps))


def dr_grpo_advantages(rewards: torch.Tensor, std_eps: float = 1e-6) -> torch.Tensor:
    """R - mean_G (Dr. GRPO: no division by the group std)."""
    return rewards - rewards.mean(dim=-1, keepdim=True)


def rloo_advantages(rewards: torch.Tensor, std_eps: float = 1e-6) -> torch.Tensor:
    """R_i minus the mean of the other G - 1 rewards of its group."""
    group_size = rewards.shape[-1]
    if group_size < 2:
        raise TrainingError("rloo advantages need at least 2 samples per group (rollout.n_samples >= 2)")
    baseline = (rewards.sum(dim=-1, keepdim=True) - rewards) / (group_size - 1)
    return rewards - baseline


ADVANTAGE_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
}


def compute_advantages(rewards: torch.Tensor, estimator: str = "grpo", std_eps: float = 1e-6) -> torch.Tensor:
    """Advantages [num_groups, G] from rewards [num_groups, G] with the named estimator."""
    if rewards.dim() != 2:
        raise TrainingError(f"rewards must be [num_groups, G], got shape {tuple(rewards.shape)}")
    try:
        fn = ADVANTAGE_ESTIMATORS[estimator]
    except KeyError:
        raise TrainingError(
            f"unknown algorithm.advantage {estimator!r}; choose one of {sorted(ADVANTAGE_ESTIMATORS)}"
        ) from None
    # float64: the means of float32 rewards are exact, so equal rewards centre to exactly 0
    return fn(rewards.float().double(), std_eps=std_eps).float()


def kl_penalized_rewards(
    rewards: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
) -> torch.Tensor:
    """KL as a reward penalty (`algorithm.kl_in: reward`): R_i - kl_coef * sum_t KL_t(o_i).

    rewards: [B]; logprobs (behaviour), ref_logprobs, mask: [B, T]. Returns [B]. The penalty is
    computed without gradient, before advantages (InstructGPT-style shaping).
    """
    with torch.no_grad():
        kl = kl_estimate(logprobs.float(), ref_logprobs.float(), kl_estimator)  # [B, T]
        return rewards - kl_coef * (kl * mask).sum(dim=-1)
