"""Training checkpoints on disk: atomic directories, keep-last-K, `latest` discovery, RNG state.

A checkpoint is one directory `step_00000042/` under a checkpoint root, written to a temporary
sibling first and renamed into place, so a crash leaves either the old set or the new one,
never a half-written checkpoint:

    model/               Hugging Face format (config.json + safetensors; LoRA merged): what an
                         engine or `load_model` reads
    adapter.safetensors  LoRA tensors (LoRA runs only; the frozen base comes from the recipe)
    trainer_state.pt     optimizer, scheduler, step, policy version, RNG states of every rank,
                         the reference policy when it has been refreshed, and caller `extra`
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from rlcpm.errors import CheckpointError
from rlcpm.models import CausalLM, ModelConfig
from rlcpm.models.checkpoint import save_model

STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"
ADAPTER_FILE = "adapter.safetensors"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_path(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root` as (step, path), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    checkpoints = list_checkpoints(root)
    return checkpoints[-1][1] if checkpoints else None


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (and stale temporary dirs); returns the deleted."""
    checkpoints = list_checkpoints(root)
    doomed = [path for _, path in checkpoints[: max(len(checkpoints) - keep_last, 0)]]
    doomed += [p for p in Path(root).glob("*.tmp-*") if p.is_dir()] if Path(root).is_dir() else []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only once the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def capture_rng_state() -> dict:
    """Python, NumPy and torch (CPU, and CUDA when present) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_hf_model(
    config: ModelConfig, named_tensors: Iterable[tuple[str, torch.Tensor]], path: str | Path
) -> Path:
    """Write HF-format weights (rlcpm.models.save_model) from (HF name, tensor) pairs, e.g. merged LoRA."""
    tensors = dict(named_tensors)
    dtype = next(iter(tensors.values())).dtype
    with torch.device("meta"):
        model = CausalLM(config)
    model = model.to(dtype).to_empty(device="cpu")
    model.tie_weights()
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise CheckpointError(f"cannot export {path}: no tensor for {missing[:5]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])
    return save_model(model, path)


def load_trainer_state(path: str | Path) -> dict:
    """Read `trainer_state.pt` of a checkpoint directory (errors name the file)."""
    state_file = Path(path) / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(
            f"{state_file}: missing; {path} is not a complete rlcpm checkpoint "
            f"(complete ones under {Path(path).parent}: {[p.name for _, p in list_checkpoints(Path(path).parent)]})"
        )
    try:
        # rlcpm's own file (RNG states and caller extras are plain Python objects).
        return torch.load(state_file, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{state_file}: cannot be read ({err})") from err
