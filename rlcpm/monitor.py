"""Metrics out of a run: `run_dir/metrics.jsonl`, wandb (online / offline / disabled), a live progress line.

Metric names follow `rollout/*`, `reward/*`, `train/*`, `perf/*`, `sys/*`, `eval/*`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from rlcpm.config import Recipe
from rlcpm.errors import RlcpmError

log = logging.getLogger("rlcpm")

# The few metrics shown on the progress line, in order, when present.
_PROGRESS_KEYS = (
    ("reward/total_mean", "reward"),
    ("reward/accuracy", "acc"),
    ("train/loss", "loss"),
    ("train/kl", "kl"),
    ("rollout/response_len_mean", "len"),
    ("perf/step_time_s", "s/step"),
    ("eval/accuracy", "eval acc"),
    ("eval/greedy/accuracy", "eval greedy acc"),
)


def setup_logging(level: str = "INFO") -> None:
    """Human-readable `rlcpm` log lines on stderr (idempotent)."""
    logger = logging.getLogger("rlcpm")
    logger.setLevel(level)
    if not any(getattr(h, "_rlcpm", False) for h in logger.handlers):
        handler = logging.StreamHandler(_CurrentStderr())
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._rlcpm = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False


class _CurrentStderr:
    """`sys.stderr` as it is at each write, not at setup: while the progress bar is live, that is
    its redirect, which prints a log line above the bar."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class Monitor:
    """Writes every step's metrics to JSONL and wandb and keeps a progress line in the terminal.

    Use as a context manager, or call `close()`. `wandb_run_id` is saved in checkpoints so a
    resumed run continues the same wandb run.
    """

    def __init__(
        self,
        recipe: Recipe,
        run_dir: str | Path,
        *,
        total_steps: int | None = None,
        wandb_run_id: str | None = None,
        start_step: int = 0,
    ):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps or recipe.learner.total_steps
        self._jsonl = None
        _start_log(self.run_dir / "samples.jsonl", start_step)  # log_samples appends to it
        if start_step == 0:  # summary() merges into the file: not into an earlier run's
            (self.run_dir / "summary.json").unlink(missing_ok=True)
        if recipe.logging.jsonl:
            path = self.run_dir / "metrics.jsonl"
            _start_log(path, start_step)
            self._jsonl = path.open("a")
        self._wandb = _start_wandb(recipe, self.run_dir, wandb_run_id)
        self._progress = _Progress(self.total_steps, start_step) if recipe.logging.progress else None
        self.history: list[dict[str, Any]] = []

    @property
    def wandb_run_id(self) -> str | None:
        return self._wandb.id if self._wandb is not None else None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        self.history.append(row)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k not in ("step", "time")}, step=step)
        if self._progress is not None:
            self._progress.update(step, row)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """A table of sampled prompts/responses/rewards (wandb Table and `samples.jsonl`)."""
        if not rows:
            return
        with (self.run_dir / "samples.jsonl").open("a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **{k: _plain(v) for k, v in r.items()}}) + "\n")
        if self._wandb is not None:
            import wandb

            columns = list(rows[0])
            table = wandb.Table(columns=["step", *columns])
            for r in rows:
                table.add_data(step, *[_plain(r.get(c)) for c in columns])
            self._wandb.log({"samples": table}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        path = self.run_dir / "summary.json"
        current = json.loads(path.read_text()) if path.exists() else {}
        current.update({k: _plain(v) for k, v in values.items()})
        path.write_text(json.dumps(current, indent=2) + "\n")
        if self._wandb is not None:
            self._wandb.summary.update(values)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_WANDB_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}


def wandb_mode(cfg) -> str:
    """logging.wandb.mode when the recipe sets it, else $WANDB_MODE (wandb's own switch), else offline."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if "mode" in cfg.model_fields_set or env not in _WANDB_ENV_MODES:
        return cfg.mode
    return _WANDB_ENV_MODES[env]


def _start_wandb(recipe: Recipe, run_dir: Path, run_id: str | None):
    cfg = recipe.logging.wandb
    mode = wandb_mode(cfg)
    if mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        return wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or run_dir.name,
            tags=cfg.tags or None,
            mode=mode,
            dir=str(run_dir),
            config=recipe.model_dump(mode="json"),
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
    except wandb.errors.UsageError as err:  # no API key for mode online, most often
        raise RlcpmError(
            f"wandb ({mode}): {err} Set WANDB_API_KEY or run `wandb login`, or set "
            "logging.wandb.mode to offline (upload later with `wandb sync`) or disabled"
        ) from err


def _start_log(path: Path, start_step: int) -> None:
    if start_step == 0 and path.exists():
        path.unlink()  # a fresh run starts a fresh file
    elif start_step > 0 and path.exists():
        _truncate_after(path, start_step)  # a resumed run drops steps it will redo


def _truncate_after(path: Path, start_step: int) -> None:
    keep = [line for line, row in metrics_lines(path) if row["step"] < start_step]
    path.write_text("".join(line + "\n" for line in keep))


def metrics_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, row) of every step logged in a metrics.jsonl. A last line cut off mid-write (the
    run was killed while logging: no newline after it) is dropped with a warning; any other
    line that is not a JSON object with a `step` raises RlcpmError naming it."""
    text = path.read_text()
    lines = text.splitlines()
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                log.warning("%s:%d: dropped a line cut off mid-write (the run stopped while logging)", path, number)
                continue
            raise RlcpmError(f"{path}:{number}: not a JSON object ({err})") from err
        if not isinstance(row, dict) or "step" not in row:
            raise RlcpmError(f"{path}:{number}: not a JSON object with a step (got {line[:60]!r})")
        out.append((line, row))
    return out


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars to Python numbers; NaN/inf to None (JSON has no NaN)."""
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class _Progress:
    """A rich progress bar with the headline metrics, or plain log lines when not a terminal."""

    def __init__(self, total: int, start: int):
        self._bar = None
        self._task = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold]rlcpm"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
                console=Console(stderr=True),  # the terminal checked above, where the log lines go
                redirect_stdout=sys.stdout.isatty(),  # prints above the bar; a redirected stdout keeps them
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=total, completed=max(start - 1, 0), info="")

    def update(self, step: int, row: dict[str, Any]) -> None:
        info = "  ".join(
            f"{short} {row[key]:.4g}"
            for key, short in _PROGRESS_KEYS
            if isinstance(row.get(key), int | float)
        )
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        else:
            log.info("step %d  %s", step, info)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
