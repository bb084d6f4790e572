"""`rlcpm quickstart`: build a tiny starting model (SFT, cached), then GRPO with chunk-wise rollout.

The held-out accuracy before and after RL is printed and written to RUN_DIR/summary.json as
`accuracy_before` / `accuracy_after` (at the rollout temperature) and `greedy_accuracy_*`.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from rlcpm.config import load_recipe
from rlcpm.errors import RlcpmError
from rlcpm.models.checkpoint import CONFIG_NAME

log = logging.getLogger("rlcpm")

QUICKSTART_RECIPE = Path("recipes/quickstart.yaml")
STARTING_MODEL_RECIPE = Path("recipes/quickstart_sft.yaml")
QUICKSTART_MARKER = ".rlcpm-quickstart"  # in a run directory the quickstart made (and may replace)


def run_quickstart(
    run_dir: str | None = None, recipe_path: str | None = None, overrides: Sequence[str] = ()
) -> dict:
    """Build the starting model if absent, then train the recipe (default: recipes/quickstart.yaml)
    in `run_dir`, else in the recipe's own run_dir; an earlier run there is replaced."""
    from rlcpm.monitor import setup_logging
    from rlcpm.trainer import train

    setup_logging()
    # A sub-million-parameter model: a second intra-op thread costs more than it gives, and
    # leaves no core to the Ray actors on a 2-core machine.
    torch.set_num_threads(1)
    path = Path(recipe_path or QUICKSTART_RECIPE)
    if not path.is_file():
        hint = "" if recipe_path else ": run from the repository root, or pass --recipe PATH"
        raise RlcpmError(f"recipe not found: {path}{hint}")
    recipe = load_recipe(path, [*([f"run_dir={run_dir}"] if run_dir else []), *overrides])
    replace_previous_run(Path(recipe.run_dir))
    start = time.perf_counter()
    if recipe.model.path and not (Path(recipe.model.path) / CONFIG_NAME).is_file():
        build_starting_model(Path(recipe.model.path), path.parent / STARTING_MODEL_RECIPE.name)
    result = train(recipe)
    summary = result.summary
    minutes = (time.perf_counter() - start) / 60
    print(f"\nquickstart finished in {minutes:.1f} min; run directory: {result.run_dir}")
    for line in result.accuracy_lines():
        print(line)
    print(f"plots: rlcpm report {result.run_dir}")
    return summary


def replace_previous_run(run_dir: Path) -> None:
    """The quickstart always starts fresh: its own earlier run in run_dir (marked by QUICKSTART_MARKER)
    is deleted first. Another rlcpm run there (it has the recipe.yaml every run writes) is refused,
    never deleted; any other directory is left alone. The new run is marked as the quickstart's."""
    if (run_dir / "recipe.yaml").is_file():
        if not (run_dir / QUICKSTART_MARKER).is_file():
            raise RlcpmError(
                f"{run_dir} holds an rlcpm run that the quickstart did not start, and the quickstart "
                "replaces only its own runs: pass --run-dir with another directory, or delete it"
            )
        log.info("replacing the earlier quickstart run in %s", run_dir)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / QUICKSTART_MARKER).write_text(
        "written by rlcpm quickstart, which replaces this run when run again\n"
    )


def build_starting_model(target: Path, sft_recipe: Path) -> Path:
    """SFT a tiny model with `sft_recipe` and install its final checkpoint at `target` (atomically)."""
    from rlcpm.trainer import train

    log.info("building the quickstart's starting model at %s (SFT, once)", target)
    recipe = load_recipe(sft_recipe)
    replace_previous_run(Path(recipe.run_dir))
    result = train(recipe)
    if result.final_model_dir is None:
        raise RlcpmError(f"the SFT run of {sft_recipe} produced no final model")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(result.final_model_dir, tmp)
    tmp.rename(target)
    return target
