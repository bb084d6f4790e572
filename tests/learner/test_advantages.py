"""Advantage estimators and the KL reward penalty on hand-computed groups."""

from __future__ import annotations

import math

import pytest
import torch

from rlcpm.errors import TrainingError
from rlcpm.learner.advantages import compute_advantages, kl_penalized_rewards

REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])


def test_grpo_group_normalisation():
    adv = compute_advantages(REWARDS, "grpo", std_eps=0.0 + 1e-12)
    std0 = math.sqrt(4 * 0.25 / 3)  # unbiased std of {1,0,0,1}
    assert adv[0].tolist() == pytest.approx([0.5 / std0, -0.5 / std0, -0.5 / std0, 0.5 / std0], rel=1e-6)
    std1 = math.sqrt((3 * 0.25**2 + 0.75**2) / 3)
    assert adv[1].tolist() == pytest.approx([-0.25 / std1] * 3 + [0.75 / std1], rel=1e-6)
    assert adv[2].tolist() == [0.0] * 4  # identical rewards: no signal


def test_dr_grpo_has_no_std_division():
    adv = compute_advantages(REWARDS, "dr_grpo")
    assert adv[0].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])
    assert adv[1].tolist() == pytest.approx([-0.25, -0.25, -0.25, 0.75])


def test_rloo_leave_one_out_baseline():
    adv = compute_advantages(REWARDS, "rloo")
    assert adv[0].tolist() == pytest.approx([1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3])
    assert adv[1].tolist() == pytest.approx([-1 / 3, -1 / 3, -1 / 3, 1.0])
    # = G/(G-1) * (R - mean)
    torch.testing.assert_close(adv, compute_advantages(REWARDS, "dr_grpo") * 4 / 3)


def test_unknown_estimator_is_named():
    with pytest.raises(TrainingError, match="ppo"):
        compute_advantages(REWARDS, "ppo")


def test_kl_as_reward_penalty():
    rewards = torch.tensor([1.0, 0.0])
    logprobs = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, -1.0, -0.1]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    out = kl_penalized_rewards(rewards, logprobs, ref, mask, kl_coef=0.1, kl_estimator="k1")
    # k1 = logp - ref: row 0: 0.5 + (-1.0) = -0.5 ; row 1: 0 + 0.5 - 0.4 = 0.1
    assert out.tolist() == pytest.approx([1.0 + 0.05, 0.0 - 0.01])


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("value, group", [(0.7, 8), (0.1, 16), (-2.994, 16), (0.9, 8)])
def test_a_group_of_identical_rewards_gets_exactly_zero(estimator, value, group):
    # float32 means of such groups round off R by ~1e-8; over a std of the same size that was +0.056
    rewards = torch.tensor([[value] * group, [1.0] + [0.0] * (group - 1)])
    advantages = compute_advantages(rewards, estimator)
    assert torch.equal(advantages[0], torch.zeros(group))
    assert advantages[1, 0] > 0 > advantages[1, 1]
