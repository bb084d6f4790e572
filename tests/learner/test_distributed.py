"""2 learner ranks (Ray actors, gloo, FSDP2) == 1 rank on the same global batch."""

from __future__ import annotations

import random

import pytest
import torch

from rlcpm.learner import RLBatch, RLSequence
from rlcpm.learner.learner import Learner


def _batches(learner: Learner, num_steps: int) -> list[RLBatch]:
    """Fixed batches: behaviour log-probs from the initial policy (so later steps are off-policy)."""
    rng = random.Random(0)
    batches = []
    for _ in range(num_steps):
        prompts = [[rng.randrange(300) for _ in range(rng.randint(3, 8))] for _ in range(7)]
        responses = [[rng.randrange(300) for _ in range(rng.randint(1, 14))] for _ in range(7)]
        behaviour = learner.response_logprobs(prompts, responses, sampling=learner.rollout_sampling)
        batches.append(
            RLBatch(
                [
                    RLSequence(p, r, lp, advantage=rng.uniform(-2, 2), is_loss_masked=(i == 5))
                    for i, (p, r, lp) in enumerate(zip(prompts, responses, behaviour))
                ]
            )
        )
    return batches


def test_two_ranks_equal_one_rank(ray_session, make_recipe, tmp_path):
    from rlcpm.learner.group import LearnerGroup

    recipe = make_recipe(
        {
            "learner": {"micro_batch_tokens": 30, "max_grad_norm": 1.0, "data_parallel": 2},
            "algorithm": {"kl_coef": 0.05, "loss_agg": "seq-mean-token-mean"},
        }
    )
    single = Learner(recipe)
    batches = _batches(single, 3)
    group = LearnerGroup(recipe)
    try:
        assert group.world_size == 2
        for batch in batches:
            expected = single.train_step(batch)
            got = group.train_step(batch)
            assert got["train/loss"] == pytest.approx(expected["train/loss"], rel=1e-5, abs=1e-7)
            assert got["train/grad_norm"] == pytest.approx(expected["train/grad_norm"], rel=1e-5)
            assert got["train/num_tokens"] == expected["train/num_tokens"]
        assert group.step == 3
        distributed = dict(group.named_weights())
        local = dict(single.named_weights())
        assert distributed.keys() == local.keys()
        for name, tensor in local.items():
            torch.testing.assert_close(distributed[name], tensor, rtol=1e-5, atol=1e-5)

        # an FSDP2 checkpoint (gathered by rank 0) loads into a single process
        group.save_checkpoint(tmp_path / "ckpt", extra={"note": "from 2 ranks"})
        reloaded = Learner(recipe)
        assert reloaded.load_checkpoint(tmp_path / "ckpt") == {"note": "from 2 ranks"}
        assert reloaded.step == 3
        for name, tensor in reloaded.named_weights():
            assert torch.equal(tensor, distributed[name])
        # same weights; the packing differs (one rank vs two), so equal up to rounding
        for mine, theirs in zip(reloaded.compute_logprobs(batches[0]), group.compute_logprobs(batches[0])):
            torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs), rtol=0, atol=1e-5)
    finally:
        group.close()
