"""Checks that fail a run in a second, before Ray, actors or models start.

A recipe that validates can still name things that are not there: a model directory, a
tokenizer, a dataset file, a reward; or sparse-attention settings that only fail together with
the checkpoint's (InfLLM v2 checks span keys and the engine's KV blocks). And a run directory may hold another run's checkpoints,
which a fresh run would mix with its own. `check_run(recipe, resume)` raises on each of these
with the fix named, instead of a traceback from a Ray actor half a minute in.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from rlcpm.config import Recipe
from rlcpm.errors import CheckpointError, DataError, RecipeError, RlcpmError, TrainingError
from rlcpm.learner.checkpoint import list_checkpoints

log = logging.getLogger("rlcpm.trainer")


def check_run(recipe: Recipe, resume: bool) -> None:
    """Everything below, in order; the first problem raises."""
    from rlcpm.trainer import run_dir_of

    sft = recipe.algorithm.name == "sft"  # its steps come from the data: the offline loop checks
    check_run_dir(run_dir_of(recipe), resume, None if sft else recipe.learner.total_steps)
    check_model_source(recipe)
    check_sparse_attention(recipe)
    check_data_paths(recipe)
    check_synthetic_data(recipe)
    check_rewards(recipe)
    check_cluster_address(recipe)


def check_cluster_address(recipe: Recipe) -> None:
    """GRPO streams the learner's weights with Ray streaming generators, which Ray Client
    (`ray://`) does not support: the run would fail at its first weight sync."""
    address = recipe.cluster.address or ""
    if recipe.algorithm.name == "grpo" and address.startswith("ray://"):
        raise TrainingError(
            f"cluster.address {address}: GRPO cannot run through Ray Client (ray://), which cannot "
            "stream the learner's weights to the rollout workers; run the driver on a node of the "
            "cluster with cluster.address: auto (or the head's host:6379)"
        )


def check_rewards(recipe: Recipe) -> None:
    """Every reward resolves: unknown names and bad kwargs raise with a did-you-mean."""
    if recipe.rewards:
        from rlcpm.rewards import resolve_terms

        resolve_terms(recipe.rewards)


def check_run_dir(run_dir: Path, resume: bool, total_steps: int | None) -> None:
    """A fresh run must not start in a directory holding an earlier run's checkpoints: its own
    would be pruned in favour of the older, higher-numbered ones, and a later resume would
    continue the old run. A resume past `total_steps` is reported (None: not known yet)."""
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    if not resume:
        if checkpoints:
            step, path = checkpoints[-1]
            raise TrainingError(
                f"{run_dir} already holds checkpoints of an earlier run (latest: {path.name}); "
                "continue it with --resume (resume=True), or choose another run_dir, or delete this one"
            )
        return
    if not checkpoints:
        log.warning("resume: no checkpoint under %s: starting a fresh run there", run_dir / "checkpoints")
    elif total_steps is not None and checkpoints[-1][0] >= total_steps:
        log.warning(
            "resume: %s is at step %d, learner.total_steps is %d: nothing left to train (raise "
            "learner.total_steps to continue); the final evaluation and export run again",
            run_dir,
            checkpoints[-1][0],
            total_steps,
        )


def check_model_source(recipe: Recipe) -> None:
    """model.path and a speculative draft hold a config.json, with one vocabulary size; the
    tokenizer directory and the FR-Spec vocabulary file exist."""
    from rlcpm.models.checkpoint import read_config

    model, speculative = recipe.model, recipe.rollout.speculative
    drafts = [("model.path", model.path), ("rollout.speculative.draft", speculative and speculative.draft)]
    vocab_sizes = []
    for key, path in drafts:
        if path is not None:
            try:
                vocab_sizes.append(read_config(Path(path).expanduser()).vocab_size)
            except CheckpointError as err:  # directory not found / no config.json / bad JSON
                raise CheckpointError(f"{key}: {err}") from err
    if len(vocab_sizes) == 2 and vocab_sizes[0] != vocab_sizes[1]:
        raise CheckpointError(
            f"rollout.speculative.draft: its vocabulary has {vocab_sizes[1]} ids, model.path's "
            f"{vocab_sizes[0]}: a draft must share the target's tokenizer and embedding size"
        )
    tokenizer = model.tokenizer or model.path
    if tokenizer is not None and not Path(tokenizer).expanduser().is_dir():
        raise DataError(f"model.tokenizer: directory not found: {tokenizer}")
    vocab = speculative and speculative.frspec_vocab
    if vocab is not None and not Path(vocab).expanduser().is_file():
        raise DataError(f"rollout.speculative.frspec_vocab: file not found: {vocab}")


def check_sparse_attention(recipe: Recipe) -> None:
    """With attention: sparse, the checkpoint's sparse_config with model.sparse_attention over it
    is a valid InfLLM v2 setting that the rollout engine's KV blocks fit (RecipeError)."""
    from rlcpm.kernels.infllm_v2.config import InfLLMv2Config
    from rlcpm.models.checkpoint import read_config
    from rlcpm.rollout.engine import DEFAULT_BLOCK_SIZE

    model = recipe.model
    if model.attention != "sparse":
        if model.sparse_attention is not None:
            log.warning(
                "model.sparse_attention is set but model.attention is %r: the settings are ignored "
                "(set model.attention: sparse to use them)",
                model.attention,
            )
        return
    base = None  # the checkpoint's settings (a missing checkpoint is check_model_source's to report)
    if model.path is not None:
        with contextlib.suppress(CheckpointError):
            base = read_config(Path(model.path).expanduser()).sparse_config
    try:
        config = InfLLMv2Config.from_dict(InfLLMv2Config.merged(base, model.sparse_config_override()))
        config.check_kv_block_size(DEFAULT_BLOCK_SIZE)
    except RlcpmError as err:
        raise RecipeError([f"model.sparse_attention: {err}"]) from err


def check_synthetic_data(recipe: Recipe, splits: tuple[str, ...] = ("train", "eval")) -> None:
    """A synthetic data.train / data.eval task takes its `options` (one row is generated: unknown
    option names and bad values raise DataError naming the split)."""
    from rlcpm.config import SyntheticData
    from rlcpm.data.synthetic import generate

    for split in splits:
        source = getattr(recipe.data, split)
        if isinstance(source, SyntheticData):
            try:
                generate(source.task, 1, source.seed, **source.options)
            except DataError as err:
                raise DataError(f"data.{split}: {err}") from err


def check_data_paths(recipe: Recipe) -> None:
    """Dataset paths of data.train / data.eval exist (synthetic tasks need nothing)."""
    for split in ("train", "eval"):
        source = getattr(recipe.data, split)
        if isinstance(source, str) and not Path(source).expanduser().exists():
            raise DataError(f"data.{split}: dataset path not found: {source}")
