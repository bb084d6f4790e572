"""Run in fresh processes by test_checkpoint.py (not a test module).

    python resume_run.py RECIPE.json CKPT_DIR OUT.safetensors --mode straight   # 5 steps, checkpoint after 3
    python resume_run.py RECIPE.json CKPT_DIR OUT.safetensors --mode resume     # load, then steps 4 and 5

Writes the final weights and the per-step losses next to OUT.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file

from rlcpm.config import Recipe
from rlcpm.learner import RLBatch, RLSequence
from rlcpm.learner.learner import Learner

NUM_STEPS, SAVE_AFTER = 5, 3


def batch_for(learner: Learner, step: int) -> RLBatch:
    """Step `step`'s batch: seeded tokens, on-policy behaviour log-probs of the current weights."""
    rng = random.Random(step)
    prompts = [[rng.randrange(300) for _ in range(rng.randint(3, 8))] for _ in range(6)]
    responses = [[rng.randrange(300) for _ in range(rng.randint(2, 10))] for _ in range(6)]
    behaviour = learner.response_logprobs(prompts, responses, sampling=learner.rollout_sampling)
    return RLBatch(
        [
            RLSequence(p, r, lp, advantage=rng.uniform(-1, 1))
            for p, r, lp in zip(prompts, responses, behaviour)
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--mode", choices=["straight", "resume"], required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = Recipe.model_validate_json(Path(args.recipe).read_text())
    learner = Learner(recipe)
    first = 0
    if args.mode == "resume":
        first = learner.load_checkpoint(args.checkpoint)["next_step"]
    losses = {}
    for step in range(first, NUM_STEPS):
        losses[step] = learner.train_step(batch_for(learner, step))["train/loss"]
        if args.mode == "straight" and step + 1 == SAVE_AFTER:
            learner.save_checkpoint(args.checkpoint, extra={"next_step": SAVE_AFTER})
    save_file({name: t.contiguous() for name, t in learner.named_weights()}, args.out)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"losses": losses, "step": learner.step}))


if __name__ == "__main__":
    main()
