"""`rlcpm report RUN_DIR`: PNG plots of a run's metrics.jsonl, one figure per metric family."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from rlcpm.errors import RlcpmError
from rlcpm.monitor import metrics_lines


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise RlcpmError(f"no metrics.jsonl in {run_dir}: is it a run directory?")
    rows = [row for _, row in metrics_lines(path)]
    if not rows:
        raise RlcpmError(f"{path}: no metrics logged yet (the run stopped before its first step)")
    return rows


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Plot every numeric metric against the step, grouped by prefix (reward/, train/, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    series: dict[str, dict[str, tuple[list, list]]] = defaultdict(dict)
    for row in rows:
        for key, value in row.items():
            if key in ("step", "time") or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            family = key.split("/", 1)[0] if "/" in key else "other"
            xs, ys = series[family].setdefault(key, ([], []))
            xs.append(row["step"])
            ys.append(value)
    written = []
    for family, metrics in sorted(series.items()):
        names = sorted(metrics)
        cols = min(3, len(names))
        nrows = (len(names) + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3 * nrows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            xs, ys = metrics[name]
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(names) :]:
            ax.axis("off")
        fig.tight_layout()
        path = out / f"{family}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
