"""The GRPO loop with chunk-wise rollout on Ray (MiniCPM4 Algorithm 1; SPECS §1).

One step, top to bottom (`GRPOTrainer.train_step`):

    while the training buffer B holds fewer than N groups:
        top up the in-flight buffer R with new prompts (G trajectories each)
        one generation round: every trajectory in R gets <= chunk_tokens new tokens, each token
            tagged with the policy version that sampled it and its behaviour log-prob
        groups whose G responses all finished: rewards -> dynamic-sampling filter -> B
    advantages over the first N groups of B -> learner update (chunk-level importance ratios)
    stream the new weights to the rollout workers (version + 1); unfinished trajectories carry over

Lifecycle: `GRPOTrainer(recipe, resume)` sets up Ray, data, learner, rollout and reward actors
(or restores them from the last checkpoint); `fit()` runs the steps; `close()` tears down.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from rlcpm.config import GRPOConfig, Recipe
from rlcpm.cpu_memory import resident_bytes
from rlcpm.data import load_examples
from rlcpm.errors import CheckpointError, TrainingError
from rlcpm.learner import RLBatch, compute_advantages, kl_penalized_rewards
from rlcpm.learner.checkpoint import checkpoint_path, latest_checkpoint, prune_checkpoints
from rlcpm.learner.model_source import resolve_model_dir
from rlcpm.monitor import Monitor, setup_logging
from rlcpm.trainer import TrainResult, run_dir_of
from rlcpm.trainer.chunk_scheduler import ChunkScheduler, PromptStream
from rlcpm.trainer.cluster import ensure_ray
from rlcpm.trainer.evaluation import evaluate
from rlcpm.trainer.export import write_final_model
from rlcpm.trainer.rollout_pool import RolloutPool
from rlcpm.trainer.scoring import attach_rewards, passes_dynamic_sampling, reward_metrics, to_samples
from rlcpm.trainer.trajectory import Group

log = logging.getLogger("rlcpm.trainer")

SHORTFALL_Z = 1.5  # in-flight groups: a round falls short of N with probability ~7%
RATE_EMA = 0.5  # weight of the old value in the pass / finish rate averages


def train_grpo(recipe: Recipe, resume: bool = False) -> TrainResult:
    trainer = GRPOTrainer(recipe, resume=resume)
    try:
        return trainer.fit()
    finally:
        trainer.close()


class GRPOTrainer:
    def __init__(self, recipe: Recipe, resume: bool = False):
        if not isinstance(recipe.algorithm, GRPOConfig):
            raise TrainingError(f"GRPOTrainer runs algorithm grpo, not {recipe.algorithm.name!r}")
        setup_logging(recipe.logging.level)
        self.recipe, self.algo = recipe, recipe.algorithm
        self.run_dir = run_dir_of(recipe)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "recipe.yaml").write_text(recipe.to_yaml())
        # one CPU per learner rank and rollout worker (RolloutPool, LearnerGroup)
        self.started_ray = ensure_ray(recipe.cluster, recipe.learner.data_parallel + recipe.rollout.workers)
        try:
            self._start(resume)
        except BaseException:  # e.g. wandb online without a key: no actor (nor Ray) outlives the error
            self.close()
            raise

    def _start(self, resume: bool) -> None:
        recipe = self.recipe
        self.model_dir = resolve_model_dir(recipe.model, self.run_dir)
        self._setup_data()
        self._setup_actors()
        self.buffer: list[Group] = []  # B: scored groups that passed the filter
        self.pass_rate = 1.0  # share of finished groups that pass dynamic sampling (EMA)
        self.finish_rate = 1.0  # share of in-flight groups that finish in a round (EMA)
        self.step = 0
        self.eval_before: dict[str, float] = {}
        self.last_groups: list[Group] = []
        self._pending_update = None  # the learner call of an update in flight
        self._held_row: tuple[int, dict] | None = None  # (step, metrics) waiting for its update
        wandb_run_id = self._restore() if resume else None
        self.monitor = Monitor(
            recipe, self.run_dir, total_steps=recipe.learner.total_steps,
            wandb_run_id=wandb_run_id, start_step=self.step + 1 if self.step > 0 else 0,  # 0: nothing restored
        )  # fmt: skip
        self._sync_weights()

    # ------------------------------------------------------------------------------ setup

    def _setup_data(self) -> None:
        from rlcpm.models import load_tokenizer

        recipe = self.recipe
        self.tokenizer = load_tokenizer(recipe.model.tokenizer or self.model_dir)
        kwargs = dict(seed=recipe.seed, algorithm="grpo", chat_template=recipe.model.chat_template)
        self.train_examples = load_examples(recipe.data, "train", self.tokenizer, **kwargs).examples
        self.eval_examples = (
            load_examples(recipe.data, "eval", self.tokenizer, **kwargs).examples if recipe.data.eval else []
        )
        self.chunks = ChunkScheduler(
            PromptStream(self.train_examples, recipe.seed, shuffle=recipe.data.shuffle),
            self.tokenize,
            n_samples=recipe.rollout.n_samples,
            max_new_tokens=recipe.rollout.max_new_tokens,
            chunk_tokens=recipe.rollout.chunk_tokens,
            seed=recipe.seed,
        )

    def tokenize(self, example) -> list[int]:
        add_special = not self.recipe.data.apply_chat_template
        return self.tokenizer.encode(example.prompt, add_special_tokens=add_special)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _setup_actors(self) -> None:
        from rlcpm.learner.group import LearnerGroup
        from rlcpm.rewards import RewardPool

        recipe = self.recipe
        self.learner = LearnerGroup(recipe, model_dir=self.model_dir)
        self.rollout = RolloutPool(recipe, self.model_dir)
        self.rewards = RewardPool(recipe.rewards, recipe.cluster.reward_workers)
        self.reward_labels = [term.label for term in self.rewards.terms]

    # ------------------------------------------------------------------------------- loop

    def fit(self) -> TrainResult:
        total = self.recipe.learner.total_steps
        if self.recipe.rollout.max_staleness and self.recipe.learner.checkpoint.every_steps == 1:
            log.warning(
                "rollout.max_staleness: 1 with learner.checkpoint.every_steps: 1: every step finishes "
                "its update to checkpoint it, so no step overlaps rollout and training"
            )
        if self.step == 0 and self.eval_examples:
            self.eval_before = self._evaluate()
            self.monitor.log(0, self.eval_before)
        while self.step < total:
            self.step += 1
            metrics = self.train_step()
            ckpt = self.recipe.learner.checkpoint
            is_checkpoint = self.step % ckpt.every_steps == 0 or (self.step == total and ckpt.save_final)
            is_eval = bool(self.eval_examples and self.recipe.eval.every_steps) and (
                self.step % self.recipe.eval.every_steps == 0 and self.step < total  # the last: _finish's
            )
            if is_checkpoint or is_eval or self.step == total:
                metrics.update(self._finish_update())  # evaluate / save the updated weights
            if is_eval:
                metrics.update(self._evaluate())
            if self._pending_update is not None:  # overlapped: the row waits for its update's metrics
                self._held_row = (self.step, metrics)
            else:
                self.monitor.log(self.step, metrics)
            if is_checkpoint:
                self.save_checkpoint()
        return self._finish()

    def train_step(self) -> dict[str, float]:
        """Rollout, then the update. With `rollout.max_staleness: 1` the update runs while the
        NEXT step's rollout samples with the current weights (one step stale at most); `fit`
        then logs this step's row once the update has finished, with its `train/*` metrics."""
        start = time.perf_counter()
        groups, metrics = self.collect_groups()
        self.last_groups = groups  # the trained batch, for inspection
        self._log_held_row(self._finish_update())  # the previous step's update, when it overlapped
        if not groups:
            log.warning(
                "step %d: no group with a learning signal after over-sampling; skipping the update", self.step
            )
            metrics.update(self.learner.skip_step())  # the LR schedule still advances
            return {**metrics, "train/skipped": 1.0, "perf/step_time_s": time.perf_counter() - start}
        metrics.update(_batch_metrics(groups, self.rollout.version))
        if metrics["rollout/loss_masked_fraction"] == 1.0:
            log.warning(
                "step %d: every response is masked from the loss (cut at rollout.max_new_tokens with "
                "overlong filtering on, repetitive, or dropped by a reward with on_error: drop): no "
                "learning signal; raise max_new_tokens, or check the rewards' errors?",
                self.step,
            )
        rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)  # [N, G]
        batch = RLBatch.from_groups(groups, torch.zeros_like(rewards))
        if self.algo.kl_coef > 0 and self.algo.kl_in == "reward":
            rewards, metrics["train/kl_penalty_mean"] = self._kl_penalized(batch, rewards)
        advantages = group_advantages(groups, rewards, self.algo)  # [N, G]
        for seq, advantage in zip(batch.sequences, advantages.flatten().tolist()):
            seq.advantage = advantage
        self._pending_update = self.learner.start("train_step", batch)
        if self.recipe.rollout.max_staleness == 0:
            metrics.update(self._finish_update())
        metrics["perf/step_time_s"] = time.perf_counter() - start
        if self.recipe.logging.samples_every and self.step % self.recipe.logging.samples_every == 0:
            self.monitor.log_samples(self.step, self._sample_rows(groups))
        return metrics

    def _log_held_row(self, update_metrics: dict[str, float]) -> None:
        """Log the overlapped previous step's row, completed with its update's metrics."""
        if self._held_row is not None:
            step, metrics = self._held_row
            self._held_row = None
            self.monitor.log(step, {**metrics, **update_metrics})

    def _finish_update(self) -> dict[str, float]:
        """Wait for the update in flight (if any), then stream its weights to the rollout workers."""
        if self._pending_update is None:
            return {}
        call, self._pending_update = self._pending_update, None
        metrics = call.result()
        metrics["perf/learn_time_s"] = call.seconds
        metrics.update(self._sync_weights())
        return metrics

    def _kl_penalized(self, batch: RLBatch, rewards: torch.Tensor) -> tuple[torch.Tensor, float]:
        """KL as a reward penalty (algorithm.kl_in: reward): R_i - beta * sum_t KL_t, before advantages."""
        ref = self.learner.compute_logprobs(batch, reference=True)
        for seq, ref_logprobs in zip(batch.sequences, ref):
            seq.ref_logprobs = ref_logprobs
        width = max(1, max(len(s.response_token_ids) for s in batch.sequences))
        behaviour, ref_padded, mask = (torch.zeros(len(batch), width) for _ in range(3))
        for i, seq in enumerate(batch.sequences):
            n = len(seq.response_token_ids)
            behaviour[i, :n] = torch.tensor(seq.behaviour_logprobs)
            ref_padded[i, :n] = torch.tensor(seq.ref_logprobs)
            mask[i, :n] = 1.0
        flat = kl_penalized_rewards(
            rewards.flatten(), behaviour, ref_padded, mask, self.algo.kl_coef, self.algo.kl_estimator
        )
        return flat.view_as(rewards), float((rewards.flatten() - flat).mean())

    def collect_groups(self) -> tuple[list[Group], dict[str, float]]:
        """Generation rounds until B holds N groups (or over-sampling hits its bound).

        Enough groups are kept in flight that about N of them finish and pass the filter per
        round: with chunking, short responses fill B while long ones carry over to the next
        step instead of stalling this one. Without chunking (or chunk >= max length) every
        group finishes in its first round: classic synchronous rollout.
        """
        n_groups = self.algo.groups_per_step
        max_groups = math.ceil(self.algo.max_oversample * n_groups)
        tried = filtered = rounds = num_tokens = 0
        sampling_s = reward_s = 0.0
        results_all = []
        while len(self.buffer) < n_groups and tried < max_groups:
            need = n_groups - len(self.buffer)
            yield_rate = max(self.pass_rate * self.finish_rate, 1.0 / self.algo.max_oversample)
            # the bound counts groups in flight too: a round finishes most of them, and every one
            # that finishes is scored (carried-over groups may still finish past it)
            target = min(groups_in_flight_for(need, yield_rate), max_groups - tried)
            self.chunks.top_up(max(0, target - self.chunks.num_in_flight_groups))
            in_flight = self.chunks.num_in_flight_groups
            requests = self.chunks.next_requests()
            group_of = {r.traj_id: r.traj_id.split(".")[0] for r in requests}
            t0 = time.perf_counter()
            results = self.rollout.generate(requests, group_of)
            sampling_s += time.perf_counter() - t0
            num_tokens += sum(len(r.token_ids) for r in results)
            finished = self.chunks.absorb(results, self.rollout.version)
            rounds += 1
            self.finish_rate = _ema(self.finish_rate, len(finished) / in_flight)
            if not finished:
                continue
            t0 = time.perf_counter()
            samples = [s for g in finished for s in to_samples(g, self.decode)]
            scored = self.rewards.score(samples)
            reward_s += time.perf_counter() - t0
            results_all.extend(scored)
            for i, group in enumerate(finished):
                G = len(group.trajectories)
                attach_rewards(group, scored[i * G : (i + 1) * G], self.algo, self.recipe.rollout)
                passed = not self.algo.dynamic_sampling or passes_dynamic_sampling(group)
                tried += 1
                filtered += not passed
                self.pass_rate = _ema(self.pass_rate, float(passed))
                if passed:
                    self.buffer.append(group)
        groups, self.buffer = self.buffer[:n_groups], self.buffer[n_groups:]
        if 0 < len(groups) < n_groups:
            log.warning(
                "step %d: only %d of %d groups passed dynamic sampling after %d finished "
                "(algorithm.max_oversample %g): training on a smaller batch; raise max_oversample, or "
                "check that the reward separates the responses",
                self.step, len(groups), n_groups, tried, self.algo.max_oversample,
            )  # fmt: skip
        metrics = {
            **reward_metrics(results_all, self.reward_labels),
            "rollout/rounds": rounds,
            "rollout/groups_finished": tried,
            "rollout/groups_filtered": filtered,
            "rollout/in_flight_groups": self.chunks.num_in_flight_groups,
            "rollout/buffered_groups": len(self.buffer),
            "rollout/pass_rate": self.pass_rate,
            "rollout/finish_rate": self.finish_rate,
            "perf/sampling_time_s": sampling_s,
            "perf/reward_time_s": reward_s,
            "perf/tokens_per_s": num_tokens / sampling_s if sampling_s > 0 else 0.0,
            "rollout/generated_tokens": num_tokens,
            **self.rollout.speculation_metrics(),
            **self.rollout.system_metrics(),
            "sys/driver_rss_gb": resident_bytes() / 1e9,
        }
        return groups, metrics

    # ------------------------------------------------------------------- weights, eval, state

    def _sync_weights(self) -> dict[str, float]:
        version = self.learner.policy_version
        buckets = self.learner.weight_buckets(dtype=self.rollout.weight_dtype)  # e.g. bfloat16 engines
        stats = self.rollout.sync_weights(buckets, version)  # a lazy stream: timed from the gather on
        return {
            "perf/sync_time_s": stats.seconds,
            "perf/sync_bytes": stats.num_bytes,
            "train/policy_version": version,
        }

    def _evaluate(self) -> dict[str, float]:
        metrics = evaluate(
            self.recipe, self.rollout, self.rewards, self.eval_examples, self.tokenize, self.decode
        )
        self.rollout.speculation_metrics()  # the evaluation's rounds are not the next step's
        return metrics

    def save_checkpoint(self) -> Path:
        root = self.run_dir / "checkpoints"
        extra = {
            "loop": {
                "step": self.step,
                "chunks": self.chunks.state_dict(),
                "buffer": self.buffer,
                "pass_rate": self.pass_rate,
                "finish_rate": self.finish_rate,
                "eval_before": self.eval_before,
                "wandb_run_id": self.monitor.wandb_run_id,
            }
        }
        path = self.learner.save_checkpoint(checkpoint_path(root, self.step), extra)
        prune_checkpoints(root, self.recipe.learner.checkpoint.keep_last)
        log.info("checkpoint: %s", path)
        return path

    def _restore(self) -> str | None:
        path = latest_checkpoint(self.run_dir / "checkpoints")
        if path is None:
            log.info("no checkpoint in %s: starting fresh", self.run_dir)
            return None
        loop = self.learner.load_checkpoint(path)["loop"]
        check_carried_group_size(loop, self.recipe.rollout.n_samples, path)
        self.step = loop["step"]
        self.chunks.load_state_dict(loop["chunks"])
        self.buffer = loop["buffer"]
        self.pass_rate = loop["pass_rate"]
        self.finish_rate = loop["finish_rate"]
        self.eval_before = loop["eval_before"]
        log.info("resumed from %s at step %d", path, self.step)
        return loop["wandb_run_id"]

    def _finish(self) -> TrainResult:
        self._finish_update()
        summary: dict[str, float] = {}
        if self.eval_examples:
            after = self._evaluate()
            self.monitor.log(self.step, after)
            summary = {
                "accuracy_before": self.eval_before.get("eval/accuracy"),
                "accuracy_after": after.get("eval/accuracy"),
                "greedy_accuracy_before": self.eval_before.get("eval/greedy/accuracy"),
                "greedy_accuracy_after": after.get("eval/greedy/accuracy"),
            }
            summary = {k: v for k, v in summary.items() if v is not None}
        final = write_final_model(self.learner, self.tokenizer, self.model_dir, self.run_dir, self.recipe.model)
        summary["steps"] = self.step
        self.monitor.summary(summary)
        return TrainResult(self.run_dir, list(self.monitor.history), final, summary)

    def _sample_rows(self, groups: list[Group]) -> list[dict]:
        rows = []
        for group in groups:
            for traj, reward in zip(group.trajectories, group.rewards or []):
                rows.append(
                    {
                        "prompt": group.example.prompt,
                        "response": self.decode(traj.response_token_ids),
                        "reward": reward,
                        "finish_reason": traj.finish_reason,
                        "versions": f"{min(traj.versions, default=0)}-{max(traj.versions, default=0)}",
                    }
                )
                if len(rows) >= self.recipe.logging.num_samples_logged:
                    return rows
        return rows

    def close(self) -> None:
        import ray

        for name in ("monitor", "rollout", "rewards", "learner"):
            part = getattr(self, name, None)
            if part is not None:
                try:
                    part.close()
                except Exception as err:  # noqa: BLE001 - teardown goes on
                    log.warning("closing %s: %s", name, err)
        if getattr(self, "started_ray", False) and ray.is_initialized():
            ray.shutdown()


def group_advantages(groups: list[Group], rewards: torch.Tensor, algo: GRPOConfig) -> torch.Tensor:
    """Advantages [N, G]; a group with dropped samples (reward on_error: drop) is normalised
    over its kept samples alone (its dropped ones get 0), so their filled-in mean rewards do
    not shrink the group's std."""
    advantages = compute_advantages(rewards, algo.advantage, algo.std_eps)
    for row, group in enumerate(groups):
        kept = [i for i, dropped in enumerate(group.dropped or []) if not dropped]
        if len(kept) == rewards.shape[1]:
            continue
        advantages[row] = 0.0
        if len(kept) >= 2:
            advantages[row, kept] = compute_advantages(
                rewards[row, kept][None], algo.advantage, algo.std_eps
            )[0]
    return advantages


def check_carried_group_size(loop: dict, n_samples: int, path: Path) -> None:
    """CheckpointError when groups the checkpoint carries over (in flight or in the training
    buffer) were sampled with another `rollout.n_samples`: a step's batch and its advantages
    are [N, G], one G for every group."""
    carried = [*loop["chunks"]["in_flight"], *loop["buffer"]]
    other = sorted({len(group.trajectories) for group in carried} - {n_samples})
    if other:
        raise CheckpointError(
            f"{path} carries over groups sampled with rollout.n_samples {other[0]}, but the recipe "
            f"has rollout.n_samples {n_samples}: resume with rollout.n_samples {other[0]}, or start "
            "a new run with the checkpoint's model/ as model.path"
        )


def groups_in_flight_for(need: int, yield_rate: float, z: float = SHORTFALL_Z) -> int:
    """Groups to keep in flight so that one round yields `need` groups with high probability.

    Each in-flight group finishes and passes the filter with probability ~`yield_rate`, so t
    groups yield ~Binomial(t, y): the smallest t with t*y - z*sqrt(t*y*(1-y)) >= need. A round
    that falls a group or two short costs a whole extra round (up to chunk_tokens more decoding
    steps); surplus groups wait in the training buffer for the next step instead. With y = 1
    (synchronous rollout, no filter) this is exactly `need`.
    """
    spread = z * math.sqrt(yield_rate * (1 - yield_rate))
    root = (spread + math.sqrt(spread**2 + 4 * yield_rate * need)) / (2 * yield_rate)
    return math.ceil(root**2 - 1e-9)


def _ema(old: float, new: float) -> float:
    return RATE_EMA * old + (1 - RATE_EMA) * new


def _carries_no_loss(group: Group, i: int) -> bool:
    """Response i has zero loss weight: masked (overlong / repetitive) or dropped by a reward
    (on_error: drop), as RLBatch.from_groups marks it."""
    masked = group.loss_mask is not None and not group.loss_mask[i]
    return masked or (group.dropped is not None and group.dropped[i])


def _batch_metrics(groups: list[Group], version: int) -> dict[str, float]:
    """Response lengths, truncation, carry-over and staleness of the trained batch."""
    trajs = [t for g in groups for t in g.trajectories]
    lengths = [len(t.response_token_ids) for t in trajs]
    tokens = [v for t in trajs for v in t.versions]
    masked = sum(_carries_no_loss(g, i) for g in groups for i in range(len(g.trajectories)))
    return {
        "rollout/response_len_mean": sum(lengths) / len(lengths),
        "rollout/response_len_max": max(lengths),
        "rollout/truncated_fraction": sum(t.finish_reason == "length" for t in trajs) / len(trajs),
        # generated over more than one round, within this step or across steps (docs/rl_loop.md)
        "rollout/carried_over_fraction": sum(t.num_chunks > 1 for t in trajs) / len(trajs),
        "rollout/multi_version_fraction": sum(t.num_versions > 1 for t in trajs) / len(trajs),
        "rollout/staleness_mean": (sum(version - v for v in tokens) / len(tokens)) if tokens else 0.0,
        "rollout/loss_masked_fraction": masked / len(trajs),
        "rollout/num_groups": len(groups),
    }
