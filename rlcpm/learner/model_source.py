"""Where the policy's weights come from: `model.path`, or a tiny random model built on the fly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rlcpm.config import ModelConfig as ModelSection
from rlcpm.errors import TrainingError
from rlcpm.learner.checkpoint import list_checkpoints
from rlcpm.models.checkpoint import CONFIG_NAME

TINY_MODEL_DIR = "tiny_model"
TINY_SPEC_FILE = "rlcpm_tiny.json"  # the `model.tiny` settings the directory was built from


def resolve_model_dir(model_cfg: ModelSection, run_dir: str | Path) -> Path:
    """The HF directory of the recipe's model; `model.tiny` is built (seeded) into run_dir/tiny_model.

    The tiny model is built once and reused while `model.tiny` stays the same. Changed settings
    rebuild it, unless the run has checkpoints (they hold weights of the old shapes): then it raises.
    """
    if model_cfg.path is not None:
        return Path(model_cfg.path).expanduser()
    path = Path(run_dir) / TINY_MODEL_DIR
    spec = model_cfg.tiny.model_dump(mode="json")
    spec_file = path / TINY_SPEC_FILE
    if (path / CONFIG_NAME).is_file():
        built = json.loads(spec_file.read_text()) if spec_file.is_file() else spec  # older runs: trusted
        if built == spec:
            return path
        if list_checkpoints(Path(run_dir) / "checkpoints"):
            changed = sorted(k for k in spec.keys() | built.keys() if spec.get(k) != built.get(k))
            raise TrainingError(
                f"model.tiny differs from the tiny model {run_dir} was built with ({', '.join(changed)}), "
                "and its checkpoints hold weights of that model: keep its settings, or use another run_dir"
            )
        shutil.rmtree(path)
    from rlcpm.models.tiny import build_tiny_model_dir

    build_tiny_model_dir(path, **model_cfg.tiny.model_dump())
    spec_file.write_text(json.dumps(spec, indent=2, sort_keys=True))
    return path
