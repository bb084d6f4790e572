"""The `rlcpm` command line: validate every shipped recipe; errors exit 2 with all problems."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rlcpm import __version__
from rlcpm.cli import main
from rlcpm.config import load_recipe
from rlcpm.rewards import resolve_terms

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml")) + sorted((ROOT / "recipes").rglob("*.yml"))


def test_there_are_recipes():
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_validates(recipe, capsys):
    assert main(["validate", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "algorithm:" in out and "rollout:" in out
    # Every reward a recipe names exists and accepts the recipe's kwargs.
    rewards = load_recipe(recipe).rewards
    if rewards:
        assert len(resolve_terms(rewards)) == len(rewards)


def test_validate_reports_three_mistakes_and_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model: {tiny: {}}\ndata: {train: {task: arithmetic}}\nrewards: [{name: math}]\n"
        "learner: {lr: -1}\nrollout: {n_sample: 4}\nlogging: {wandb: {mode: sometimes}}\n"
    )
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err
    assert "learner.lr" in err and "rollout.n_sample" in err and "logging.wandb.mode" in err
    assert "did you mean 'rollout.n_samples'" in err


def test_validate_applies_overrides(capsys):
    assert main(["validate", str(ROOT / "recipes/quickstart.yaml"), "learner.lr=0.125"]) == 0
    assert "lr: 0.125" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["validate", "train", "sft"])
def test_a_missing_recipe_is_the_only_required_argument_named(command, capsys):
    with pytest.raises(SystemExit):
        main([command])
    # not "recipe, overrides"
    assert "the following arguments are required: recipe\n" in capsys.readouterr().err


def test_quickstart_says_to_pass_a_recipe_only_when_its_own_is_missing(monkeypatch, tmp_path, capsys):
    assert main(["quickstart", "--recipe", str(tmp_path / "mine.yaml")]) == 1
    assert capsys.readouterr().err == f"error: recipe not found: {tmp_path / 'mine.yaml'}\n"
    monkeypatch.chdir(tmp_path)  # the default recipe is relative to the repository root
    assert main(["quickstart"]) == 1
    assert "not found: recipes/quickstart.yaml: run from the repository root" in capsys.readouterr().err


def test_quickstart_runs_in_its_recipes_run_dir_unless_given_one(monkeypatch, tmp_path):
    """`rlcpm quickstart --recipe recipes/bitcpm_qat.yaml` (README) writes runs/bitcpm_qat: it used
    to write, and so replace, runs/quickstart."""
    from rlcpm import trainer
    from rlcpm.trainer import TrainResult

    run_dirs = []

    def fake_train(recipe):
        run_dirs.append(recipe.run_dir)
        return TrainResult(tmp_path)

    monkeypatch.setattr(trainer, "train", fake_train)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")  # the starting model is built already
    qat = str(ROOT / "recipes" / "bitcpm_qat.yaml")
    assert main(["quickstart", "--recipe", qat, "model.path=model"]) == 0
    assert main(["quickstart", "--recipe", qat, "--run-dir", "runs/mine", "model.path=model"]) == 0
    assert run_dirs == ["runs/bitcpm_qat", "runs/mine"]


def test_console_script_version():
    out = subprocess.run(
        [sys.executable, "-m", "rlcpm.cli", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"rlcpm {__version__}"


def test_sft_replaces_a_grpo_algorithm_section_and_keeps_an_sft_one(capsys):
    from rlcpm.cli import sft_recipe

    grpo = ROOT / "recipes" / "quickstart.yaml"
    assert load_recipe(grpo).algorithm.name == "grpo"
    recipe = sft_recipe(str(grpo), ["algorithm.epochs=2"])  # an sft key, applied after the swap
    assert recipe.algorithm.name == "sft" and recipe.algorithm.epochs == 2
    assert "grpo algorithm section" in capsys.readouterr().err
    sft = ROOT / "recipes" / "quickstart_sft.yaml"
    written = load_recipe(sft).algorithm
    assert written.name == "sft" and sft_recipe(str(sft), []).algorithm == written


def test_bench_names_the_available_benchmarks_and_needs_the_repository_root(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["bench", "nosuch"]) == 1
    err = capsys.readouterr().err
    assert "unknown benchmark 'nosuch'" in err and "sparse_attention" in err and "common" not in err
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "sparse_attention"]) == 1
    assert "run `rlcpm bench` from the repository root" in capsys.readouterr().err


def test_validate_fails_on_an_unknown_reward_and_notes_paths_missing_here(capsys):
    quickstart = str(ROOT / "recipes" / "quickstart.yaml")
    assert main(["validate", quickstart, "rewards=[{name: mathh}]"]) == 2
    assert "did you mean 'math'" in capsys.readouterr().err
    assert main(["validate", quickstart, "data.train=/nowhere/train.jsonl"]) == 0
    assert (
        "note: on this machine, data.train: dataset path not found: /nowhere/train.jsonl"
        in capsys.readouterr().err
    )


def test_validate_fails_on_sparse_settings_the_engine_cannot_page(capsys):
    quickstart = str(ROOT / "recipes" / "quickstart.yaml")
    stride_3 = "model.sparse_attention={kernel_size: 6, kernel_stride: 3, block_size: 12, window_size: 24}"
    assert main(["validate", quickstart, "model.attention=sparse", stride_3]) == 2
    assert (
        "model.sparse_attention: sparse attention: the engine's KV block_size (16)" in capsys.readouterr().err
    )


def test_a_run_reports_its_held_out_accuracy_before_and_after():
    from rlcpm.trainer import TrainResult

    result = TrainResult(Path("runs/x"), summary={"accuracy_before": 0.51, "accuracy_after": 0.845,
                                                  "greedy_accuracy_before": 0.835})  # fmt: skip
    assert result.accuracy_lines() == ["held-out accuracy (sampled): 51.0% -> 84.5% (+33.5 points)"]


def test_validate_fails_on_a_synthetic_task_option_the_generator_does_not_take(capsys):
    quickstart = str(ROOT / "recipes" / "quickstart.yaml")
    assert main(["validate", quickstart, "data.eval.options={digitz: 2}"]) == 2
    err = capsys.readouterr().err
    assert "data.eval: synthetic task 'arithmetic': unknown option(s) ['digitz']" in err
    assert main(["validate", quickstart, "data.train.options.num_steps=[3, 1]"]) == 2
    assert "data.train: synthetic option 'num_steps' must satisfy 1 <= low <= high" in capsys.readouterr().err


def test_validate_reports_every_reward_and_data_problem_at_once(capsys):
    quickstart = str(ROOT / "recipes" / "quickstart.yaml")
    rewards = "rewards=[{name: mathh}, {name: math}, {name: formatt}]"
    bad_options = ["data.train.options={digitz: 2}", "data.eval.options={digitz: 2}"]
    assert main(["validate", quickstart, rewards, *bad_options]) == 2
    err = capsys.readouterr().err
    assert "4 problem(s)" in err
    assert "rewards[0]: unknown reward name 'mathh'" in err
    assert "rewards[2]: unknown reward name 'formatt'" in err
    assert "data.train: synthetic task" in err and "data.eval: synthetic task" in err


def test_a_reward_module_in_the_working_directory_imports_as_under_python_m(monkeypatch, tmp_path, capsys):
    """The `rlcpm` console script's sys.path lacks the working directory; `fn: my_module:f` for a
    file beside the user failed with ModuleNotFoundError there (it worked under `python -m`)."""
    import os
    import sys

    (tmp_path / "cwd_reward_module.py").write_text("def score(sample):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    quickstart = str(ROOT / "recipes/quickstart.yaml")
    assert main(["validate", quickstart, "rewards=[{fn: 'cwd_reward_module:score'}]"]) == 0


def test_quickstart_replaces_only_its_own_runs(tmp_path):
    """`rlcpm quickstart --run-dir DIR` deleted any rlcpm run in DIR, a real training run included."""
    from rlcpm.errors import RlcpmError
    from rlcpm.quickstart import QUICKSTART_MARKER, replace_previous_run

    own, other = tmp_path / "own", tmp_path / "other"
    replace_previous_run(own)
    (own / "recipe.yaml").write_text("run_dir: own\n")
    (own / "metrics.jsonl").write_text("{}\n")
    replace_previous_run(own)  # its own earlier run: replaced
    assert sorted(p.name for p in own.iterdir()) == [QUICKSTART_MARKER]
    other.mkdir()
    (other / "recipe.yaml").write_text("run_dir: other\n")
    with pytest.raises(RlcpmError, match="did not start"):
        replace_previous_run(other)
    assert (other / "recipe.yaml").is_file()
