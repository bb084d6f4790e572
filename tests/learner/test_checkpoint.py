"""Checkpoints: train 3, save, load in a fresh process, train 2 == train 5 straight (bit-exact on CPU);
atomic writes, keep-last-K, `latest` discovery."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlcpm.errors import CheckpointError
from rlcpm.learner import checkpoint as ckpt

SCRIPT = Path(__file__).with_name("resume_run.py")


def _run(recipe_file: Path, checkpoint: Path, out: Path, mode: str) -> dict:
    subprocess.run(
        [sys.executable, str(SCRIPT), str(recipe_file), str(checkpoint), str(out), "--mode", mode],
        check=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    return json.loads(out.with_suffix(".json").read_text())


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(
            {"algorithm": {"kl_coef": 0.05, "ref_refresh_every": 2}, "learner": {"max_grad_norm": 0.5}},
            id="full-refreshed-reference",
        ),
        pytest.param(
            {
                "algorithm": {"kl_coef": 0.05},
                "learner": {
                    "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.1, "targets": ["q_proj", "up_proj"]}
                },
            },
            id="lora-with-dropout-rng",
        ),
    ],
)
def test_resume_in_fresh_process_is_bit_exact(make_recipe, tmp_path, overrides):
    schedule = {"name": "wsd", "warmup_steps": 2, "decay_fraction": 0.4, "decay_form": "linear"}
    recipe = make_recipe(
        {**overrides, "learner": {**overrides["learner"], "total_steps": 5, "schedule": schedule}}
    )
    recipe_file = tmp_path / "recipe.json"
    recipe_file.write_text(recipe.model_dump_json())
    checkpoint = tmp_path / "ckpt" / "step_00000003"

    straight = _run(recipe_file, checkpoint, tmp_path / "straight.safetensors", "straight")
    resumed = _run(recipe_file, checkpoint, tmp_path / "resumed.safetensors", "resume")

    assert straight["step"] == resumed["step"] == 5
    assert resumed["losses"] == {k: v for k, v in straight["losses"].items() if int(k) >= 3}
    a, b = load_file(tmp_path / "straight.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (checkpoint / ckpt.MODEL_DIR / "config.json").is_file()
    assert (checkpoint / ckpt.ADAPTER_FILE).is_file() == (recipe.learner.lora is not None)


def test_atomic_directory_keeps_old_checkpoint_on_failure(tmp_path):
    target = tmp_path / "step_00000001"
    with ckpt.atomic_directory(target) as tmp:
        (tmp / ckpt.STATE_FILE).write_text("v1")
    with pytest.raises(RuntimeError):
        with ckpt.atomic_directory(target) as tmp:
            (tmp / ckpt.STATE_FILE).write_text("v2")
            raise RuntimeError("crash while writing")
    assert (target / ckpt.STATE_FILE).read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]


def test_latest_and_keep_last(tmp_path):
    for step in (2, 10, 7):
        with ckpt.atomic_directory(ckpt.checkpoint_path(tmp_path, step)) as tmp:
            (tmp / ckpt.STATE_FILE).write_text(str(step))
    (tmp_path / "step_00000011").mkdir()  # incomplete: no state file
    (tmp_path / "step_00000012.tmp-99").mkdir()  # a crashed write
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000010"
    ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [7, 10]
    assert not (tmp_path / "step_00000012.tmp-99").exists()
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None


def test_loading_an_incomplete_checkpoint_names_the_file(tmp_path):
    (tmp_path / "step_00000004").mkdir()
    with pytest.raises(CheckpointError, match="trainer_state.pt"):
        ckpt.load_trainer_state(tmp_path / "step_00000004")


def test_resume_refuses_a_checkpoint_of_another_lora_setup(make_recipe, tmp_path):
    """A changed alpha resumed silently into a different policy (log-probs off by up to 0.34);
    a full fine-tune's checkpoint under LoRA was a bare FileNotFoundError."""
    from rlcpm.learner.learner import Learner

    lora = {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj"]}
    Learner(make_recipe({"learner": {"lora": lora}})).save_checkpoint(tmp_path / "lora")
    Learner(make_recipe()).save_checkpoint(tmp_path / "full")
    Learner(make_recipe({"learner": {"lora": {**lora, "targets": ["v_proj", "q_proj"]}}})).load_checkpoint(
        tmp_path / "lora"
    )  # the same setup (targets in another order)
    with pytest.raises(CheckpointError, match=r"learner.lora.alpha 8.0 there, 16.0 here"):
        Learner(make_recipe({"learner": {"lora": {**lora, "alpha": 16.0}}})).load_checkpoint(tmp_path / "lora")
    with pytest.raises(CheckpointError, match="written with LoRA"):
        Learner(make_recipe()).load_checkpoint(tmp_path / "lora")
    with pytest.raises(CheckpointError, match="written without LoRA"):
        Learner(make_recipe({"learner": {"lora": lora}})).load_checkpoint(tmp_path / "full")


def test_a_resume_with_more_total_steps_trains_at_the_new_schedules_rate(make_recipe, tmp_path):
    """The preflight says to raise learner.total_steps to continue a finished run; the first update
    after that resume ran at the rate the OLD schedule had left in the optimizer (0 here: wasted)."""
    from rlcpm.learner.learner import Learner
    from rlcpm.learner.schedules import lr_multiplier

    schedule = {"name": "wsd", "warmup_steps": 0, "decay_fraction": 0.5, "decay_form": "linear"}
    finished = Learner(make_recipe({"learner": {"total_steps": 4, "schedule": schedule}}))
    for _ in range(4):
        finished.skip_step()
    assert finished.lr == 0.0
    finished.save_checkpoint(tmp_path / "step_00000004")

    recipe = make_recipe({"learner": {"total_steps": 8, "schedule": schedule}})
    resumed = Learner(recipe)
    resumed.load_checkpoint(tmp_path / "step_00000004")
    expected = recipe.learner.lr * lr_multiplier(5, recipe.learner.schedule, 8)  # 0.75 eta, not 0
    assert resumed.lr == pytest.approx(expected)


def test_a_resume_with_another_lr_trains_at_the_new_rate(make_recipe, tmp_path, caplog):
    """A recipe override of learner.lr on resume takes effect (with a warning): the checkpoint's
    scheduler state carried the old peak rate and silently kept it."""
    from rlcpm.learner.learner import Learner

    Learner(make_recipe({"learner": {"lr": 1e-3}})).save_checkpoint(tmp_path / "step_00000000")
    resumed = Learner(make_recipe({"learner": {"lr": 5e-4}}))
    with caplog.at_level("WARNING", logger="rlcpm.learner.learner"):
        resumed.load_checkpoint(tmp_path / "step_00000000")
    assert resumed.scheduler.base_lrs == [5e-4] * len(resumed.scheduler.base_lrs)
    assert resumed.lr == pytest.approx(5e-4 * resumed.scheduler.lr_lambdas[0](resumed.scheduler.last_epoch))
    assert "learner.lr changed since the checkpoint" in caplog.text
