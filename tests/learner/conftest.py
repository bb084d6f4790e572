"""Fixtures for learner tests: a tiny HF model directory, recipes around it, random RL batches."""

from __future__ import annotations

import random

import pytest
import torch

from rlcpm.config import deep_merge, load_recipe


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny models are latency-bound; one intra-op thread avoids OpenMP spin on a shared 2-core box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer llama (hidden 32) with the real tiny BPE tokenizer, as a HF directory."""
    from rlcpm.models.tiny import build_tiny_model_dir

    return build_tiny_model_dir(
        tmp_path_factory.mktemp("learner") / "tiny",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        seed=0,
        init_std=0.05,
    )


@pytest.fixture
def make_recipe(tiny_model_dir, tmp_path):
    """make_recipe({...nested overrides...}) -> Recipe for the tiny model on CPU, float32."""

    def make(overrides: dict | None = None):
        base = {
            "seed": 0,
            "run_dir": str(tmp_path / "run"),
            "model": {"path": str(tiny_model_dir), "device": "cpu", "dtype": "float32"},
            "data": {"train": {"task": "arithmetic", "num_samples": 64}},
            "rewards": [{"name": "math"}],
            "rollout": {"n_samples": 4, "temperature": 1.0},
            "learner": {"lr": 1e-3, "total_steps": 10, "max_grad_norm": None, "micro_batch_tokens": 4096},
            "algorithm": {"name": "grpo", "kl_coef": 0.0},
        }
        overrides = overrides or {}
        if overrides.get("algorithm", {}).get("name", "grpo") != "grpo":
            base["algorithm"] = {}  # another algorithm's section, not GRPO's keys
        return load_recipe(data=deep_merge(base, overrides))

    return make


@pytest.fixture
def make_rl_batch():
    """make_rl_batch(learner, num_groups=2, group_size=4, seed=0) -> RLBatch whose behaviour
    log-probs are the learner's own (on-policy), with random rewards turned into GRPO advantages."""
    from rlcpm.learner import RLBatch, RLSequence, compute_advantages

    def make(learner, num_groups: int = 2, group_size: int = 4, seed: int = 0, vocab: int = 300):
        rng = random.Random(seed)
        prompts, responses = [], []
        for _ in range(num_groups):
            prompt = [rng.randrange(vocab) for _ in range(rng.randint(3, 9))]
            for _ in range(group_size):
                prompts.append(prompt)
                responses.append([rng.randrange(vocab) for _ in range(rng.randint(2, 12))])
        rewards = torch.tensor(
            [[float(rng.random() < 0.5) for _ in range(group_size)] for _ in range(num_groups)]
        )
        rewards[:, 0], rewards[:, 1] = 1.0, 0.0  # every group has signal
        advantages = compute_advantages(rewards, "grpo").flatten().tolist()
        behaviour = learner.response_logprobs(prompts, responses, sampling=learner.rollout_sampling)
        sequences = [
            RLSequence(p, r, lp, advantage=a, versions=[0] * len(r), group_id=str(i // group_size))
            for i, (p, r, lp, a) in enumerate(zip(prompts, responses, behaviour, advantages))
        ]
        return RLBatch(sequences)

    return make
