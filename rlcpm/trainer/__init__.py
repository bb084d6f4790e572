"""Training entry points: `train(recipe)` runs GRPO (the RL loop on Ray) or SFT / DPO (offline)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlcpm.config import Recipe
from rlcpm.errors import RecipeError


@dataclass
class TrainResult:
    """What a run leaves behind: the metrics history, the run directory and the final checkpoint."""

    run_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    final_model_dir: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    def accuracy_lines(self) -> list[str]:
        """'held-out accuracy (sampled|greedy): before -> after (+points)' for what the run measured."""
        lines = []
        for label, key in (("sampled", "accuracy"), ("greedy", "greedy_accuracy")):
            before, after = self.summary.get(f"{key}_before"), self.summary.get(f"{key}_after")
            if before is not None and after is not None:
                lines.append(
                    f"held-out accuracy ({label}): {before:.1%} -> {after:.1%} ({(after - before) * 100:+.1f} points)"
                )
        return lines


def run_dir_of(recipe: Recipe) -> Path:
    """Where a run writes: `run_dir`, else runs/<algorithm>."""
    return Path(recipe.run_dir or f"runs/{recipe.algorithm.name}")


def train(recipe: Recipe, resume: bool = False) -> TrainResult:
    """Run a recipe to the end; `resume=True` continues from the last checkpoint in run_dir.

    A fresh run refuses a run_dir that holds another run's checkpoints; missing model, tokenizer
    or dataset paths and unknown rewards fail before Ray starts (rlcpm.trainer.preflight)."""
    from rlcpm.monitor import setup_logging
    from rlcpm.trainer.preflight import check_run

    if not isinstance(recipe, Recipe):
        raise RecipeError(
            [
                f"train() takes a Recipe, got {type(recipe).__name__}: load it first with "
                "rlcpm.load_recipe(path, overrides=[...]) (a dict: rlcpm.load_recipe(data={...}))"
            ]
        )
    setup_logging(recipe.logging.level)
    check_run(recipe, resume)
    if recipe.algorithm.name == "grpo":
        from rlcpm.trainer.rl_loop import train_grpo

        return train_grpo(recipe, resume=resume)
    from rlcpm.trainer.offline import train_offline

    return train_offline(recipe, resume=resume)


__all__ = ["TrainResult", "run_dir_of", "train"]
