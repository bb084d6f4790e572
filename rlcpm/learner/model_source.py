"""Where the policy's weights come from: `model.path`, or a tiny random model built on the fly."""

from __future__ import annotations

from pathlib import Path

from rlcpm.config import ModelConfig as ModelSection
from rlcpm.models.checkpoint import CONFIG_NAME

TINY_MODEL_DIR = "tiny_model"


def resolve_model_dir(model_cfg: ModelSection, run_dir: str | Path) -> Path:
    """The HF directory of the recipe's model; `model.tiny` is built (seeded) into run_dir/tiny_model once."""
    if model_cfg.path is not None:
        return Path(model_cfg.path).expanduser()
    path = Path(run_dir) / TINY_MODEL_DIR
    if not (path / CONFIG_NAME).is_file():
        from rlcpm.models.tiny import build_tiny_model_dir

        tiny = model_cfg.tiny.model_dump()
        build_tiny_model_dir(path, **tiny)
    return path
