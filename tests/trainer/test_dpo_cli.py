"""DPO end to end through `rlcpm train` (the CLI) on synthetic preferences: accuracy rises."""

from __future__ import annotations

import json

import yaml

from rlcpm.cli import main
from rlcpm.models.tiny import build_tiny_model_dir


def test_dpo_through_rlcpm_train(tmp_path):
    model_dir = build_tiny_model_dir(
        tmp_path / "model", "llama", hidden_size=32, intermediate_size=64, seed=0
    )
    recipe = {
        "seed": 0,
        "run_dir": str(tmp_path / "run"),
        "model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
        "data": {"train": {"task": "preference", "num_samples": 96, "seed": 0}, "apply_chat_template": False},
        "algorithm": {"name": "dpo", "beta": 0.5, "pairs_per_step": 16},
        "learner": {"lr": 3e-3, "total_steps": 16, "checkpoint": {"every_steps": 100}},
        "logging": {"wandb": {"mode": "offline"}, "progress": False},
    }
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["train/accuracy"] for r in rows if "train/accuracy" in r]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(accuracy) == 16
    assert abs(losses[0] - 0.6931) < 1e-3  # pi == pi_ref at the first step: loss = log 2
    # Each step's accuracy is measured on fresh pairs before the update: it rises from chance.
    first, last = sum(accuracy[:4]) / 4, sum(accuracy[-6:]) / 6
    assert last > 0.6 and last > first + 0.1, accuracy
    assert sum(losses[-6:]) / 6 < losses[0]
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_dpo_with_ternary_qat_trains_the_ternary_policy_and_exports_it(tmp_path):
    """learner.qat in a DPO recipe: policy and reference both run W_q (the reference is the
    quantized policy at the start, so the first loss is log 2), the loss falls, and the final
    model is the packed ternary export."""
    from rlcpm import load_recipe, train
    from rlcpm.models import load_model
    from rlcpm.quant.ternary_linear import TernaryLinear

    model_dir = build_tiny_model_dir(
        tmp_path / "model", "llama", hidden_size=32, intermediate_size=64, seed=0
    )
    recipe = load_recipe(
        data={
            "seed": 0,
            "run_dir": str(tmp_path / "run"),
            "model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
            "data": {
                "train": {"task": "preference", "num_samples": 64, "seed": 0},
                "apply_chat_template": False,
            },
            "algorithm": {"name": "dpo", "beta": 0.5, "pairs_per_step": 16},
            "learner": {
                "lr": 3e-3,
                "total_steps": 8,
                "qat": {"enabled": True, "group_size": 16, "rewarmup_steps": 2},
                "checkpoint": {"every_steps": 100},
            },
            "logging": {"wandb": {"mode": "disabled"}, "progress": False},
        }
    )
    result = train(recipe)
    losses = [r["train/loss"] for r in result.history if "train/loss" in r]
    assert abs(losses[0] - 0.6931) < 1e-3 and min(losses[-3:]) < losses[0]
    assert any(isinstance(m, TernaryLinear) for m in load_model(result.final_model_dir).modules())
