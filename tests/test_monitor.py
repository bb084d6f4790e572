"""Monitor: JSONL rows, real wandb in offline mode, resume truncation, samples table."""

from __future__ import annotations

import io
import json
import math

import torch

from rlcpm.config import load_recipe
from rlcpm.monitor import Monitor


def _recipe(tmp_path, mode="offline", progress=False):
    return load_recipe(
        data={
            "model": {"tiny": {}},
            "data": {"train": {"task": "arithmetic"}},
            "rewards": [{"name": "math"}],
            "logging": {"wandb": {"mode": mode, "project": "rlcpm-test"}, "progress": progress},
            "run_dir": str(tmp_path / "run"),
        }
    )


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_and_offline_wandb(tmp_path):
    recipe = _recipe(tmp_path)
    with Monitor(recipe, recipe.run_dir, total_steps=3) as mon:
        mon.log(1, {"reward/mean": torch.tensor(0.5), "train/loss": 1.25, "train/kl": math.nan})
        mon.log(2, {"reward/mean": 0.75})
        mon.log_samples(2, [{"prompt": "1+1=", "response": "2", "reward": 1.0}])
        mon.summary({"accuracy_after": 0.9})
        run_id = mon.wandb_run_id
    rows = _rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["reward/mean"] == 0.5 and rows[0]["train/loss"] == 1.25 and rows[0]["train/kl"] is None
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == {"accuracy_after": 0.9}
    assert _rows(tmp_path / "run" / "samples.jsonl")[0]["response"] == "2"
    runs = list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert runs and any(runs[0].glob("*.wandb"))


def test_resume_drops_steps_to_be_redone(tmp_path):
    recipe = _recipe(tmp_path, mode="disabled")
    with Monitor(recipe, recipe.run_dir) as mon:
        for step in range(1, 6):
            mon.log(step, {"train/loss": float(step)})
    with Monitor(recipe, recipe.run_dir, start_step=3) as mon:
        mon.log(3, {"train/loss": 30.0})
    rows = _rows(tmp_path / "run" / "metrics.jsonl")
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    with Monitor(recipe, recipe.run_dir) as mon:  # a fresh run starts a fresh file
        mon.log(1, {"train/loss": 7.0})
    assert len(_rows(tmp_path / "run" / "metrics.jsonl")) == 1


def test_a_fresh_run_starts_a_fresh_summary(tmp_path):
    """A fresh run in a run_dir an earlier run wrote (one that kept no checkpoint) kept that
    run's summary.json keys: its accuracies stood beside the new run's steps."""
    recipe = _recipe(tmp_path, mode="disabled")
    with Monitor(recipe, recipe.run_dir) as mon:
        mon.summary({"accuracy_before": 0.25, "accuracy_after": 0.5, "steps": 10})
    with Monitor(recipe, recipe.run_dir, start_step=4) as mon:  # a resume keeps what it does not redo
        mon.summary({"steps": 12})
    path = tmp_path / "run" / "summary.json"
    assert json.loads(path.read_text()) == {"accuracy_before": 0.25, "accuracy_after": 0.5, "steps": 12}
    with Monitor(recipe, recipe.run_dir) as mon:  # a fresh run without evaluation
        mon.summary({"steps": 3})
    assert json.loads(path.read_text()) == {"steps": 3}


def test_resume_after_a_kill_mid_write_drops_the_torn_line(tmp_path, rlcpm_log):
    """A run killed while writing a metrics row leaves half a line; resume (and `rlcpm report`)
    drop it with a warning instead of failing on it. A bad line elsewhere is still an error."""
    import pytest

    from rlcpm.errors import RlcpmError
    from rlcpm.report import read_metrics

    recipe = _recipe(tmp_path, mode="disabled")
    with Monitor(recipe, recipe.run_dir) as mon:
        for step in range(1, 4):
            mon.log(step, {"train/loss": float(step)})
    path = tmp_path / "run" / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 4, "train/lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]
    with Monitor(recipe, recipe.run_dir, start_step=3) as mon:
        mon.log(3, {"train/loss": 30.0})
    assert [(r["step"], r["train/loss"]) for r in _rows(path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert "cut off mid-write" in rlcpm_log.text
    path.write_text('{"step": 1}\n{"step": 2, "tr\n{"step": 3}\n')
    with pytest.raises(RlcpmError, match="metrics.jsonl:2: not a JSON object"):
        read_metrics(tmp_path / "run")


def test_resume_drops_sample_rows_of_steps_to_be_redone(tmp_path):
    """samples.jsonl follows metrics.jsonl: a resumed run rewrites the steps after its
    checkpoint instead of appending them a second time; a fresh run starts a fresh file."""
    recipe = _recipe(tmp_path, mode="disabled")
    with Monitor(recipe, recipe.run_dir) as mon:
        for step in range(1, 5):
            mon.log_samples(step, [{"response": f"old {step}"}])
    with Monitor(recipe, recipe.run_dir, start_step=3) as mon:  # checkpoint at step 2
        mon.log_samples(3, [{"response": "redone 3"}])
    path = tmp_path / "run" / "samples.jsonl"
    assert [(r["step"], r["response"]) for r in _rows(path)] == [(1, "old 1"), (2, "old 2"), (3, "redone 3")]
    with Monitor(recipe, recipe.run_dir) as mon:
        mon.log_samples(1, [{"response": "new run"}])
    assert [r["response"] for r in _rows(path)] == ["new run"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_is_drawn_on_stderr_the_terminal_it_checked(tmp_path, monkeypatch, capsys):
    """With stderr a terminal and stdout redirected (`rlcpm train r.yaml > out.log`), the bar and
    its metrics show on stderr: it was drawn on stdout, so the terminal showed no progress at all
    and the log file got the bar's last frame."""
    recipe = _recipe(tmp_path, mode="disabled", progress=True)
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with Monitor(recipe, recipe.run_dir, total_steps=2) as mon:
        mon.log(1, {"train/loss": 1.25})
        print("a print stays on stdout")
        mon.log(2, {"train/loss": 0.75})
    assert capsys.readouterr().out == "a print stays on stdout\n"
    assert "2/2" in terminal.getvalue() and "loss 0.75" in terminal.getvalue()


def test_log_lines_print_above_the_progress_bar(tmp_path, monkeypatch):
    """rlcpm's log lines go through the live bar's redirect of stderr, so each prints on a line
    of its own above the bar: the handler kept the stderr of setup time, so a warning was glued
    to the end of the bar's line and the bar redrawn after it."""
    import logging
    import re

    from rlcpm.monitor import setup_logging

    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    setup_logging()
    recipe = _recipe(tmp_path, mode="disabled", progress=True)
    with Monitor(recipe, recipe.run_dir, total_steps=2) as mon:
        mon.log(1, {"train/loss": 1.25})
        logging.getLogger("rlcpm.test").warning("hello")
        mon.log(2, {"train/loss": 0.75})
    out = terminal.getvalue()
    assert re.search(r"\x1b\[2K\d\d:\d\d:\d\d WARNING rlcpm.test: hello", out), out


def test_wandb_mode_follows_wandb_mode_env_unless_the_recipe_sets_it(tmp_path, monkeypatch):
    """WANDB_MODE=disabled (wandb's own switch) was ignored: the recipe's default, offline, won."""
    from rlcpm.monitor import wandb_mode

    monkeypatch.setenv("WANDB_MODE", "disabled")
    sections = {
        "model": {"tiny": {}},
        "data": {"train": {"task": "arithmetic"}},
        "rewards": [{"name": "math"}],
    }
    unset = load_recipe(data=sections)
    assert wandb_mode(unset.logging.wandb) == "disabled"
    with Monitor(unset, tmp_path / "run") as mon:
        assert mon.wandb_run_id is None
    assert not (tmp_path / "run" / "wandb").exists()
    assert wandb_mode(_recipe(tmp_path, mode="offline").logging.wandb) == "offline"  # the recipe wins
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert wandb_mode(unset.logging.wandb) == "offline"
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode(unset.logging.wandb) == "offline"  # the default
