"""Offline training loops: SFT on demonstrations and DPO on preference pairs.

    result = train_offline(recipe)          # algorithm: sft | dpo
    result.final_model_dir                  # run_dir/final: HF model + tokenizer, ready for the engine

Lifecycle: setup (model, tokenizer, data, learner, resume) -> train (one optimizer update per
step, metrics to the Monitor, a checkpoint every `learner.checkpoint.every_steps`) -> finish
(run_dir/final, evaluation, summary). SFT runs `ceil(epochs * N / samples_per_step)` steps (the
learning-rate schedule spans exactly those); DPO runs `learner.total_steps` steps of
`pairs_per_step` pairs. With `precompute_ref` DPO scores every pair under the initial policy
(= pi_ref) before the first update, and keeps those numbers in each checkpoint.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

from rlcpm.config import DPOConfig, Recipe, SFTConfig
from rlcpm.errors import TrainingError
from rlcpm.learner.checkpoint import checkpoint_path, latest_checkpoint, prune_checkpoints
from rlcpm.learner.model_source import resolve_model_dir
from rlcpm.learner.offline_data import prompt_ids, step_indices, tokenize_demonstrations, tokenize_preferences
from rlcpm.models import load_tokenizer
from rlcpm.monitor import Monitor, setup_logging
from rlcpm.trainer import TrainResult, run_dir_of
from rlcpm.trainer.export import write_final_model

log = logging.getLogger("rlcpm.trainer")


def train_offline(recipe: Recipe, resume: bool = False) -> TrainResult:
    """Run an SFT or DPO recipe to the end; `resume` continues from run_dir's last checkpoint."""
    algo = recipe.algorithm
    if not isinstance(algo, SFTConfig | DPOConfig):
        raise TrainingError(f"train_offline runs algorithm sft or dpo, not {algo.name!r}")
    setup_logging(recipe.logging.level)
    run_dir = run_dir_of(recipe)
    model_dir = resolve_model_dir(recipe.model, run_dir)
    tokenizer = load_tokenizer(recipe.model.tokenizer or model_dir)
    items = _load_items(recipe, tokenizer)
    batch_size = algo.samples_per_step if isinstance(algo, SFTConfig) else algo.pairs_per_step
    batch_size = min(batch_size, len(items))
    num_steps = _num_steps(recipe, len(items), batch_size)
    if isinstance(algo, SFTConfig) and "total_steps" in recipe.learner.model_fields_set:
        if recipe.learner.total_steps != num_steps:
            log.warning(
                "sft: learner.total_steps (%d) is not used; the run takes ceil(epochs x rows / "
                "samples_per_step) = %d steps (set algorithm.epochs instead)",
                recipe.learner.total_steps,
                num_steps,
            )
    recipe = recipe.model_copy(deep=True)
    recipe.learner.total_steps = num_steps  # the schedule spans the steps this run takes
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(recipe.to_yaml())

    learner, owns_ray = _make_learner(recipe, model_dir)
    try:  # from here on an error (a bad checkpoint or eval file) still closes the learner
        checkpoints = run_dir / "checkpoints"
        start, extra = 0, {}
        latest = latest_checkpoint(checkpoints) if resume else None
        if latest is not None:
            extra = learner.load_checkpoint(latest)
            start = extra["next_step"]
            log.info("resumed from %s at step %d", latest, start)
            if isinstance(algo, SFTConfig) and start >= num_steps:
                log.warning(
                    "resume: %s is at step %d of the %d this recipe takes: nothing left to train (raise "
                    "algorithm.epochs to continue); the final evaluation and export run again",
                    run_dir,
                    start,
                    num_steps,
                )
        elif resume:
            log.info("no checkpoint under %s: starting from step 0", checkpoints)
        if isinstance(algo, DPOConfig) and algo.precompute_ref:
            _attach_reference_logps(learner, items, extra)

        evaluator = _Evaluator.maybe(recipe, tokenizer, model_dir)
        summary: dict[str, float] = {}
        with Monitor(
            recipe, run_dir, total_steps=num_steps, wandb_run_id=extra.get("wandb_run_id"),
            start_step=start + 1 if latest is not None else 0,  # the first step this run logs (1-based)
        ) as monitor:  # fmt: skip
            if evaluator is not None and start == 0:
                extra["eval_before"] = evaluator.run(learner)
            for step in range(start, num_steps):
                indices = step_indices(len(items), batch_size, step, recipe.seed, recipe.data.shuffle)
                batch = [items[i] for i in indices]
                metrics = learner.sft_step(batch) if isinstance(algo, SFTConfig) else learner.dpo_step(batch)
                metrics["train/epoch"] = (step + 1) * batch_size / len(items)
                if (
                    evaluator is not None
                    and recipe.eval.every_steps
                    and (step + 1) % recipe.eval.every_steps == 0
                ):
                    metrics.update(evaluator.run(learner))
                monitor.log(step + 1, metrics)
                if (step + 1) % recipe.learner.checkpoint.every_steps == 0 or step + 1 == num_steps:
                    state = {"next_step": step + 1, "wandb_run_id": monitor.wandb_run_id}
                    for key in ("ref_logps", "eval_before"):
                        if key in extra:
                            state[key] = extra[key]
                    learner.save_checkpoint(checkpoint_path(checkpoints, step + 1), extra=state)
                    prune_checkpoints(checkpoints, recipe.learner.checkpoint.keep_last)
            final_dir = (
                write_final_model(learner, tokenizer, model_dir, run_dir, recipe.model)
                if recipe.learner.checkpoint.save_final
                else None
            )
            if evaluator is not None:
                summary.update(evaluator.summary(extra.get("eval_before"), evaluator.run(learner)))
            summary["train/steps"] = float(num_steps)
            monitor.summary(summary)
            history = list(monitor.history)
    finally:
        learner.close()
        if owns_ray:
            import ray

            ray.shutdown()
    return TrainResult(run_dir=run_dir, history=history, final_model_dir=final_dir, summary=summary)


# ----------------------------------------------------------------------------------- setup


def _load_items(recipe: Recipe, tokenizer) -> list:
    from rlcpm.data import load_examples

    algo = recipe.algorithm
    loaded = load_examples(
        recipe.data,
        "train",
        tokenizer,
        seed=recipe.seed,
        algorithm=algo.name,
        chat_template=recipe.model.chat_template,
    )
    tokenize = tokenize_demonstrations if isinstance(algo, SFTConfig) else tokenize_preferences
    items, num_too_long = tokenize(loaded.examples, tokenizer, algo.max_seq_len)
    if num_too_long:
        log.warning(
            "%d rows skipped: the prompt alone exceeds algorithm.max_seq_len=%d",
            num_too_long,
            algo.max_seq_len,
        )
    if not items:
        raise TrainingError(
            f"no training rows in {loaded.source} (skipped: {loaded.num_skipped + num_too_long})"
        )
    return items


def _num_steps(recipe: Recipe, num_items: int, batch_size: int) -> int:
    algo = recipe.algorithm
    if isinstance(algo, SFTConfig):
        return max(1, math.ceil(algo.epochs * num_items / batch_size))
    return recipe.learner.total_steps


def _make_learner(recipe: Recipe, model_dir: Path):
    """A Learner in this process, or a LearnerGroup on Ray for learner.data_parallel > 1."""
    if recipe.learner.data_parallel > 1:
        from rlcpm.learner.group import LearnerGroup
        from rlcpm.trainer.cluster import ensure_ray

        owns_ray = ensure_ray(recipe.cluster, recipe.learner.data_parallel)  # a CPU per rank
        return LearnerGroup(recipe, model_dir=model_dir), owns_ray
    from rlcpm.learner.learner import Learner

    return Learner(recipe, model_dir=model_dir), False


def _attach_reference_logps(learner, pairs: Sequence, extra: dict) -> None:
    """pi_ref sequence log-probs of every pair: from the checkpoint, or from the untrained policy."""
    if "ref_logps" not in extra:
        if learner.step != 0:
            raise TrainingError(
                "DPO reference log-probs are missing from the checkpoint; restart without --resume"
            )
        prompts = [p.prompt_token_ids for p in pairs for _ in (0, 1)]
        responses = [r for p in pairs for r in (p.chosen_token_ids, p.rejected_token_ids)]
        extra["ref_logps"] = learner.sequence_logprobs(prompts, responses)
    ref = extra["ref_logps"]
    if len(ref) != 2 * len(pairs):
        raise TrainingError(
            f"the checkpoint holds reference log-probs for {len(ref) // 2} pairs, the data has {len(pairs)}"
        )
    for pair, chosen, rejected in zip(pairs, ref[0::2], ref[1::2]):
        pair.ref_chosen_logp, pair.ref_rejected_logp = chosen, rejected


# ---------------------------------------------------------------------------------- finish


class _Evaluator:
    """Greedy (or sampled) generation on `data.eval` with rlcpm's engine; accuracy by the math
    reward. The engine runs as a GRPO run's rollout workers would: on the model's device, in the
    rollout dtype, with the model's attention backend."""

    def __init__(self, recipe: Recipe, tokenizer, model_dir: Path, examples: list):
        from rlcpm.learner.learner import resolve_device
        from rlcpm.rollout import Engine
        from rlcpm.trainer.rollout_pool import engine_dtype

        self.recipe, self.tokenizer, self.examples = recipe, tokenizer, examples
        self.model_dir = model_dir
        model = recipe.model
        self.engine = Engine.from_pretrained(
            str(model_dir),
            dtype=engine_dtype(recipe),
            device=resolve_device(model.device),
            tokenizer_path=model.tokenizer,  # None: the model's own
            attention=model.attention,
            sparse_config=model.sparse_config_override(),
            seed=recipe.seed,
        )

    @classmethod
    def maybe(cls, recipe: Recipe, tokenizer, model_dir: Path) -> _Evaluator | None:
        if recipe.data.eval is None:
            return None
        from rlcpm.data import load_examples

        loaded = load_examples(
            recipe.data, "eval", tokenizer, seed=recipe.seed, chat_template=recipe.model.chat_template
        )
        examples = [e for e in loaded.examples if e.answer is not None][: recipe.eval.num_prompts]
        return cls(recipe, tokenizer, model_dir, examples) if examples else None

    def summary(self, before: dict[str, float] | None, after: dict[str, float]) -> dict[str, float]:
        """The eval metrics after training and, with a `_before` suffix, before it; plus the
        accuracy under the names the CLI prints (`greedy_accuracy_*` or `accuracy_*`)."""
        label = "greedy_accuracy" if self.recipe.eval.greedy else "accuracy"
        summary = {**after, f"{label}_after": after["eval/accuracy"]}
        if before is not None:
            summary.update({f"{k}_before": v for k, v in before.items()})
            summary[f"{label}_before"] = before["eval/accuracy"]
        return summary

    def run(self, learner) -> dict[str, float]:
        from rlcpm.rewards import math as math_reward
        from rlcpm.trainer.evaluation import check_not_refused, eval_sampling_params
        from rlcpm.trainer.rollout_pool import engine_weight_dtype

        dtype = engine_weight_dtype(self.recipe, self.model_dir)
        tensors = ((name, t.to(dtype)) for name, t in learner.named_weights())
        self.engine.update_weights(tensors, version=learner.policy_version)
        rollout, eval_cfg = self.recipe.rollout, self.recipe.eval
        if eval_cfg.greedy:
            temperature = 0.0
        else:  # eval.temperature 0 is greedy, not unset
            temperature = eval_cfg.temperature if eval_cfg.temperature is not None else rollout.temperature
        params = eval_sampling_params(self.recipe, temperature, len(self.examples))
        prompts = [prompt_ids(self.tokenizer, e) for e in self.examples]
        outputs = check_not_refused(self.engine.generate(prompts, params))
        texts = [self.tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outputs]
        correct = [math_reward.score(text, e.answer) for text, e in zip(texts, self.examples)]
        return {
            "eval/accuracy": sum(correct) / len(correct),
            "eval/response_len_mean": sum(len(o.token_ids) for o in outputs) / len(outputs),
        }
