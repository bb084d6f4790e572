"""`Learner`: one training process — policy, optimizer, schedule, reference, checkpoints.

The RL loop drives it with typed batches; the offline loop (rlcpm.trainer.offline) with SFT
demonstrations and DPO pairs. One update:

    plan packed micro-batches (token budget; this rank's share of the batch)
    for each micro-batch: forward -> log-probs -> loss with the batch's GLOBAL denominator -> backward
    clip the gradient norm -> AdamW step -> learning-rate schedule step

Run as rank r of N inside a torch.distributed group (rlcpm.learner.group.LearnerGroup), the
model is sharded with FSDP2 and every method is called on every rank in step; results are
the same on every rank.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from rlcpm.config import DPOConfig, GRPOConfig, Recipe
from rlcpm.errors import CheckpointError, TrainingError
from rlcpm.kernels.cpu_gemm import use_onednn_linears
from rlcpm.learner import checkpoint as ckpt
from rlcpm.learner.batch import PreferencePair, RLBatch, SFTSequence
from rlcpm.learner.distributed import all_gather_objects, all_reduce_max, is_distributed, shard_model
from rlcpm.learner.lora import adapter_state, apply_lora, merged_named_tensors
from rlcpm.learner.model_source import resolve_model_dir
from rlcpm.learner.objectives import LossFn, dpo_objective, flatten_pairs, grpo_objective, sft_objective
from rlcpm.learner.optim import build_optimizer, clip_gradients
from rlcpm.learner.packing import PackedMicroBatch, placeholder_micro_batch, plan_micro_batches
from rlcpm.learner.policy_head import PolicyWithLogprobHead, SamplingSpec
from rlcpm.learner.reference import ReferencePolicy
from rlcpm.learner.schedules import build_lr_scheduler
from rlcpm.learner.step_stats import StepStats
from rlcpm.learner.weights import DEFAULT_BUCKET_BYTES, NamedTensors, iter_weight_buckets
from rlcpm.models import load_model
from rlcpm.models.checkpoint import QAT_LATENT_KEY, checkpoint_files, read_config, resolve_dtype
from rlcpm.quant import (
    TernaryLinear,
    prepare_qat,
    quantized_named_tensors,
    save_ternary_model,
    with_rewarmup,
)

logger = logging.getLogger(__name__)


class Learner:
    """One learner process. See the module docstring; `LearnerGroup` offers the same interface."""

    def __init__(
        self, recipe: Recipe, *, model_dir: str | Path | None = None, rank: int = 0, world_size: int = 1
    ):
        self.recipe, self.config, self.algorithm = recipe, recipe.learner, recipe.algorithm
        self.rank, self.world_size = rank, world_size
        self.device = resolve_device(recipe.model.device)
        self.uses_bf16_autocast = self.config.precision == "bf16-mixed" or (
            self.config.precision == "auto" and self.device.type == "cuda"
        )
        self.model_dir = (
            Path(model_dir)
            if model_dir
            else resolve_model_dir(recipe.model, recipe.run_dir or "runs/default")
        )
        lora = self.config.lora if self.config.lora is not None and self.config.lora.enabled else None
        self.qat = self.config.qat if self.config.qat is not None and self.config.qat.enabled else None

        torch.manual_seed(recipe.seed)  # identical LoRA initialisation on every rank
        # Master weights stay float32 whatever the checkpoint's dtype; bf16 lives in autocast.
        self.policy = load_model(
            self.model_dir,
            dtype=torch.float32,
            device=self.device,
            attention=recipe.model.attention,
            sparse_config=recipe.model.sparse_config_override(),
        )
        packed = next((n for n, m in self.policy.named_modules() if isinstance(m, TernaryLinear)), None)
        if packed is not None:  # its decoder is uint8 codes (buffers): only embeddings and norms would train
            raise TrainingError(
                f"{self.model_dir} is a packed ternary export ({packed} is a packed ternary layer): it cannot "
                "be trained; start from the high-precision checkpoint (with learner.qat for ternary training)"
            )
        # The final export's dtype: model.dtype, else the checkpoint's (what the engines sample in).
        self.export_dtype = resolve_dtype(recipe.model.dtype, read_config(self.model_dir).torch_dtype)
        if recipe.model.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
        if self.device.type == "cpu" and self.config.cpu_gemm == "onednn":
            use_onednn_linears(self.policy)  # before QAT and LoRA, which wrap or replace linears
        if self.qat is not None:  # BitCPM ternary QAT (rlcpm.quant): decoder linears -> BitLinear
            prepare_qat(self.policy, self.qat)  # (LearnerConfig refuses lora together with qat)
        if lora is not None:
            apply_lora(self.policy, lora)
        if isinstance(self.algorithm, GRPOConfig):
            # The importance ratio must compare the function the engine sampled from, which has
            # no dropout: with LoRA dropout on, on-policy tokens got ratios of 1 +- 1e-2.
            disable_dropout(self.policy)
        self.uses_lora = lora is not None
        # what an adapter checkpoint must match on resume (alpha scales it: a silent change would
        # resume a different policy)
        self._lora_settings = (
            {"rank": lora.rank, "alpha": lora.alpha, "targets": sorted(lora.targets)} if lora else None
        )
        self.shares_prompts = (
            self.config.share_prompts and self.policy.attention_backend.supports_shared_prefix
        )
        self.policy.train()
        self.root = PolicyWithLogprobHead(self.policy, self.config.logprob_chunk_tokens)
        self.reference = self._build_reference()
        if world_size > 1:
            shard_model(self.root, self.policy.model.layers)
            if self.reference is not None:
                self.reference.shard(lambda root: shard_model(root, root.policy.model.layers))
        self.optimizer = build_optimizer(self.root, self.config.optimizer, self.config.lr)
        schedule = with_rewarmup(self.config.schedule, self.qat)  # QAT re-warms the learning rate
        self.scheduler = build_lr_scheduler(self.optimizer, schedule, self.config.total_steps)
        self.step = 0
        self.policy_version = 0
        torch.manual_seed(recipe.seed + 1000 * rank)  # each rank's own stream from here on

    # ------------------------------------------------------------------------------ setup

    def _build_reference(self) -> ReferencePolicy | None:
        algo = self.algorithm
        needs = (isinstance(algo, GRPOConfig) and algo.kl_coef > 0) or (
            isinstance(algo, DPOConfig) and not algo.precompute_ref
        )
        if not needs:
            return None
        can_refresh = isinstance(algo, GRPOConfig) and algo.ref_refresh_every is not None
        return ReferencePolicy(self.root, uses_lora=self.uses_lora, can_refresh=can_refresh)

    def _autocast(self):
        """bf16 autocast over float32 master weights (bf16-mixed; auto on a GPU), else nothing."""
        if self.uses_bf16_autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    @property
    def rollout_sampling(self) -> SamplingSpec:
        """The distribution the engine samples from (recipe.rollout): RL log-probs use it."""
        rollout = self.recipe.rollout
        return SamplingSpec(rollout.temperature, rollout.top_k, rollout.top_p)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # --------------------------------------------------------------------------- log-probs

    def response_logprobs(
        self,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        *,
        reference: bool = False,
        sampling: SamplingSpec | None = None,
    ) -> list[list[float]]:
        """Per-token log-probs of each response given its prompt, under the policy (or pi_ref)."""
        sampling = sampling or SamplingSpec()
        if reference and self.reference is None:
            raise TrainingError(
                "no reference policy in this run (it needs kl_coef > 0, or DPO without precompute_ref)"
            )
        micro_batches = self._plan(prompts, responses)
        found: dict[int, list[float]] = {}
        was_training = self.root.training
        self.root.eval()
        with torch.no_grad(), self._autocast():
            for mb in micro_batches:
                device_mb = mb.to(self.device)
                if reference:
                    logprobs = self.reference.logprobs(self.root, device_mb, sampling)
                else:
                    logprobs = self.root(device_mb, sampling)[0]
                if mb.is_placeholder:
                    continue
                padded = mb.to_padded(logprobs.float().cpu())
                for row, index in enumerate(mb.sequence_ids):
                    found[index] = padded[row, : len(responses[index])].tolist()
        self.root.train(was_training)
        merged: dict[int, list[float]] = {}
        for part in all_gather_objects(found):
            merged.update(part)
        return [merged.get(i, []) for i in range(len(prompts))]

    def compute_logprobs(self, batch: RLBatch, *, reference: bool = False) -> list[list[float]]:
        """log pi_theta (or log pi_ref) of every response token of an RL batch, as the engine samples."""
        prompts = [s.prompt_token_ids for s in batch.sequences]
        responses = [s.response_token_ids for s in batch.sequences]
        return self.response_logprobs(prompts, responses, reference=reference, sampling=self.rollout_sampling)

    def sequence_logprobs(
        self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *, reference: bool = False
    ) -> list[float]:
        """Summed response log-probs (DPO's log pi(y|x)); reference=False before training = pi_ref."""
        return [sum(lp) for lp in self.response_logprobs(prompts, responses, reference=reference)]

    # ------------------------------------------------------------------------------ updates

    def train_step(self, batch: RLBatch) -> dict[str, float]:
        """One RL step: `algorithm.mini_batches` optimizer updates of the GRPO-family loss."""
        algo = self.algorithm
        if not isinstance(algo, GRPOConfig):
            raise TrainingError(f"train_step trains GRPO; algorithm {algo.name!r} uses sft_step / dpo_step")
        if algo.kl_coef > 0 and algo.kl_in == "loss" and any(s.ref_logprobs is None for s in batch.sequences):
            for seq, ref in zip(batch.sequences, self.compute_logprobs(batch, reference=True)):
                seq.ref_logprobs = ref
        num_mini = min(algo.mini_batches, max(len(batch), 1))
        bounds = [round(i * len(batch) / num_mini) for i in range(num_mini + 1)]
        stats = StepStats()
        for lo, hi in zip(bounds, bounds[1:]):
            stats.merge(self._update_policy(RLBatch(batch.sequences[lo:hi])))
        metrics = self._finish_step(stats)
        self._maybe_refresh_reference()
        return metrics

    def skip_step(self) -> dict[str, float]:
        """A step with nothing to train (no group passed dynamic sampling): the weights and the
        policy version stay, the learning-rate schedule and the step count advance as a trained
        step's would, so the schedule stays a function of the run's step and still ends decayed.
        Returns `train/lr`: the rate this step would have trained at."""
        lr = self.lr
        self.scheduler.step()
        self.step += 1
        self._maybe_refresh_reference()
        return {"train/lr": lr}

    def _maybe_refresh_reference(self) -> None:
        every = getattr(self.algorithm, "ref_refresh_every", None)
        if every and self.step % every == 0 and self.reference is not None:
            self.reference.refresh(self.root)

    def _update_policy(self, batch: RLBatch) -> StepStats:
        """One optimizer update on `batch`; loss-masked responses are not even packed."""
        prompts = [s.prompt_token_ids for s in batch.sequences]
        responses = [[] if s.is_loss_masked else s.response_token_ids for s in batch.sequences]
        return self._update(
            prompts, responses, None, grpo_objective(self.algorithm, batch), self.rollout_sampling
        )

    def sft_step(self, examples: Sequence[SFTSequence]) -> dict[str, float]:
        """One optimizer update of the SFT loss (NLL of response tokens, token mean over the batch)."""
        prompts = [e.prompt_token_ids for e in examples]
        responses = [e.response_token_ids for e in examples]
        loss_fn = sft_objective(num_tokens=sum(len(r) for r in responses))
        return self._finish_step(self._update(prompts, responses, None, loss_fn, SamplingSpec()))

    def dpo_step(self, pairs: Sequence[PreferencePair]) -> dict[str, float]:
        """One optimizer update of the DPO-family loss over `pairs` (reference log-probs filled if
        missing: by the reference policy, or with precompute_ref by the policy before its first update)."""
        algo = self.algorithm
        if not isinstance(algo, DPOConfig):
            raise TrainingError(f"dpo_step needs algorithm dpo, the recipe has {algo.name!r}")
        missing = [p for p in pairs if p.ref_chosen_logp is None or p.ref_rejected_logp is None]
        if missing and self.reference is None and self.step > 0:  # pi_ref = the initial policy, gone
            raise TrainingError(
                f"{len(missing)} DPO pairs without reference log-probs at step {self.step}: with "
                "algorithm.precompute_ref pi_ref is the initial policy, which only scores pairs before "
                "the first update (fill ref_chosen_logp / ref_rejected_logp with learner.sequence_logprobs "
                "then), or set precompute_ref: false to keep a reference policy"
            )
        if missing:
            ref = self.sequence_logprobs(*flatten_pairs(missing), reference=self.reference is not None)
            for pair, chosen, rejected in zip(missing, ref[0::2], ref[1::2]):
                pair.ref_chosen_logp, pair.ref_rejected_logp = chosen, rejected
        prompts, responses = flatten_pairs(pairs)
        units = [[2 * i, 2 * i + 1] for i in range(len(pairs))]  # a pair shares its micro-batch
        return self._finish_step(
            self._update(prompts, responses, units, dpo_objective(algo, pairs), SamplingSpec())
        )

    def _plan(self, prompts, responses, units=None) -> list[PackedMicroBatch]:
        """This rank's micro-batches, padded with placeholders to the same count on every rank."""
        self._check_token_ids(prompts, responses)
        micro_batches = plan_micro_batches(
            prompts,
            responses,
            self.config.micro_batch_tokens,
            units=units,
            rank=self.rank,
            world_size=self.world_size,
            share_prompts=self.shares_prompts,
        )
        num = all_reduce_max(len(micro_batches))
        micro_batches += [placeholder_micro_batch() for _ in range(num - len(micro_batches))]
        return micro_batches

    def _check_token_ids(self, prompts, responses) -> None:
        """Ids past the embedding (a tokenizer larger than the model) would fail deep in torch's gather."""
        vocab_size = self.policy.config.vocab_size
        for index, (prompt, response) in enumerate(zip(prompts, responses)):
            ids = [*prompt, *response]
            if ids and not (0 <= min(ids) and max(ids) < vocab_size):
                bad = next(t for t in ids if not 0 <= t < vocab_size)
                raise TrainingError(
                    f"sequence {index}: token id {bad} is outside the model's vocabulary [0, {vocab_size}) "
                    "(does the tokenizer match the model? model.tokenizer)"
                )

    def _update(self, prompts, responses, units, loss_fn: LossFn, sampling: SamplingSpec) -> StepStats:
        """Accumulate gradients over this rank's micro-batches, clip, and take one optimizer step."""
        started = time.perf_counter()
        stats = StepStats()
        self.optimizer.zero_grad(set_to_none=True)
        for mb in self._plan(prompts, responses, units):
            device_mb = mb.to(self.device)
            with self._autocast():
                logprobs, entropy = self.root(device_mb, sampling)
            if mb.is_placeholder:  # same collectives as the other ranks, zero gradient
                loss = torch.where(torch.isfinite(logprobs), logprobs, 0.0).sum() * 0.0
                loss.backward()
                continue
            loss, loss_stats = loss_fn(mb, logprobs, entropy)
            loss.backward()
            stats.add(loss.item(), loss_stats, num_tokens=device_mb.targets.numel())
        stats.set("grad_norm", clip_gradients(self.root, self.config.max_grad_norm))
        stats.set("lr", self.lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats.elapsed_s += time.perf_counter() - started
        return stats

    def _finish_step(self, stats: StepStats) -> dict[str, float]:
        self.scheduler.step()
        self.step += 1
        self.policy_version += 1
        metrics = stats.reduce()
        metrics["train/step"] = float(self.step)
        return metrics

    # ------------------------------------------------------------------------------ weights

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) as the policy's forward uses them: LoRA merged on the fly, and the
        ternary W_q under QAT (what engines must sample from). A collective under FSDP2."""
        if self.qat is not None:
            return quantized_named_tensors(self.policy, self.latent_weights())
        return self.latent_weights()

    def latent_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) of the trained tensors themselves, LoRA merged: the high-precision latent
        weights under QAT (checkpoints; `save_ternary_model` quantizes them). A collective under FSDP2."""
        return merged_named_tensors(self.policy)

    def weight_buckets(
        self, bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype: torch.dtype | None = None
    ) -> Iterator[NamedTensors]:
        """Buckets of (HF name, CPU tensor) for `engine.update_weights`."""
        return iter_weight_buckets(self.named_weights(), bucket_bytes, dtype)

    def export_hf(self, path: str | Path) -> Path:
        """Write the policy (LoRA merged; packed ternary under QAT) as a Hugging Face directory (rank 0
        writes), in `export_dtype`: a bfloat16 checkpoint trained on float32 master weights comes
        back as bfloat16, the weights its engines sampled with."""
        tensors = list(self.latent_weights())
        if self.rank == 0 and self.qat is not None:
            save_ternary_model(self.policy, path, named_tensors=tensors, dtype=self.export_dtype)
        elif self.rank == 0:
            cast = [(name, t.to(self.export_dtype) if t.is_floating_point() else t) for name, t in tensors]
            ckpt.save_hf_model(self.policy.config, cast, path)
        _barrier()
        return Path(path)

    # -------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, path: str | Path, extra: dict | None = None) -> Path:
        """Write model, optimizer, scheduler, RNG, step and `extra` atomically to `path`."""
        path = Path(path)
        tensors = list(self.latent_weights())
        adapter = adapter_state(self.policy) if self.uses_lora else None
        options = StateDictOptions(full_state_dict=True, cpu_offload=True) if is_distributed() else None
        optimizer_state = get_optimizer_state_dict(self.root, self.optimizer, options=options)
        reference_state = None
        if self.reference is not None and self.reference.num_refreshes > 0:
            reference_state = dict(merged_named_tensors(self.reference.frozen.policy))
        rng_states = all_gather_objects(ckpt.capture_rng_state())
        if self.rank == 0:
            config = self.policy.config
            if self.qat is not None:  # model/ holds the latent weights, not the ternary model trained
                marker = {"group_size": self.qat.group_size, "load": "Learner.load_checkpoint or the final export"}
                config = dataclasses.replace(config, extra={**config.extra, QAT_LATENT_KEY: marker})
            with ckpt.atomic_directory(path) as tmp:
                ckpt.save_hf_model(config, tensors, tmp / ckpt.MODEL_DIR)
                if adapter is not None:
                    save_file(
                        {k: v.contiguous().cpu() for k, v in adapter.items()}, str(tmp / ckpt.ADAPTER_FILE)
                    )
                state = {
                    "step": self.step,
                    "policy_version": self.policy_version,
                    "optimizer": optimizer_state,
                    "scheduler": self.scheduler.state_dict(),
                    "rng": rng_states,
                    "reference": reference_state,
                    "reference_refreshes": self.reference.num_refreshes if self.reference else 0,
                    "lora": self._lora_settings,
                    "extra": extra or {},
                }
                torch.save(state, tmp / ckpt.STATE_FILE)
        _barrier()
        return path

    def load_checkpoint(self, path: str | Path) -> dict:
        """Restore everything `save_checkpoint` wrote; returns its `extra`."""
        path = Path(path)
        state = ckpt.load_trainer_state(path)
        self._check_lora_settings(path, state)
        if self.uses_lora:
            weights = load_file(str(path / ckpt.ADAPTER_FILE))
        else:
            model_dir = path / ckpt.MODEL_DIR
            weights = {}
            for file in checkpoint_files(model_dir):
                weights.update(load_file(str(file)))
        self._load_weights(self.root, {f"policy.{k}": v for k, v in weights.items()})
        options = StateDictOptions(full_state_dict=True) if is_distributed() else None
        set_optimizer_state_dict(self.root, self.optimizer, state["optimizer"], options=options)
        scheduler = self.scheduler
        configured_lrs = list(scheduler.base_lrs)
        scheduler.load_state_dict(state["scheduler"])
        if scheduler.base_lrs != configured_lrs:
            logger.warning(
                "learner.lr changed since the checkpoint (%s -> %s): the schedule continues at this run's rate",
                scheduler.base_lrs[0], configured_lrs[0],
            )  # fmt: skip
            scheduler.base_lrs = configured_lrs
        # The next update's rate under THIS run's schedule: a resume may raise learner.total_steps
        # or change learner.lr, and the optimizer state holds the rate the checkpoint's schedule set.
        for group, base, lr_fn in zip(self.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * lr_fn(scheduler.last_epoch)
        self.step, self.policy_version = state["step"], state["policy_version"]
        if state.get("reference") is not None and self.reference is not None:
            self._load_weights(
                self.reference.frozen, {f"policy.{k}": v for k, v in state["reference"].items()}
            )
            self.reference.num_refreshes = state["reference_refreshes"]
        rng = state["rng"]
        ckpt.restore_rng_state(rng[self.rank] if self.rank < len(rng) else rng[0])
        return state["extra"]

    def _check_lora_settings(self, path: Path, state: dict) -> None:
        """CheckpointError when the checkpoint's LoRA setup is not this learner's: LoRA on one side
        only (its adapter file tells), or other rank / alpha / targets (when recorded)."""
        has_adapter = (path / ckpt.ADAPTER_FILE).is_file()
        if self.uses_lora != has_adapter:
            written = "with LoRA" if has_adapter else "without LoRA (a full fine-tune)"
            raise CheckpointError(
                f"{path} was written {written}: resume it with the same learner.lora setting, or "
                "start a new run with its model/ (adapters merged) as model.path"
            )
        saved = state.get("lora")  # None: written before the settings were recorded
        if self.uses_lora and saved is not None and saved != self._lora_settings:
            changed = {k: (saved.get(k), v) for k, v in self._lora_settings.items() if saved.get(k) != v}
            raise CheckpointError(
                f"{path} was written with other LoRA settings: "
                + ", ".join(f"learner.lora.{k} {old!r} there, {new!r} here" for k, (old, new) in changed.items())
                + " (the adapters would mean a different policy); resume with the checkpoint's settings"
            )

    @staticmethod
    def _load_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
        names = {name for name, _ in module.named_parameters()}
        unknown = sorted(set(weights) - names)
        if unknown:
            raise TrainingError(
                f"checkpoint tensors not in the model: {unknown[:5]} (different architecture or LoRA setup?)"
            )
        options = StateDictOptions(full_state_dict=is_distributed(), strict=False)
        set_model_state_dict(module, weights, options=options)

    def close(self) -> None:
        """Release the process group (barrier first, for gloo)."""
        from rlcpm.learner.distributed import destroy_process_group

        destroy_process_group()


def resolve_device(device: str) -> torch.device:
    """model.device -> a torch device ("auto": CUDA when one is visible, else the CPU)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("model.device is cuda but no CUDA device is visible; use device: cpu or auto")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def _barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def disable_dropout(model: torch.nn.Module) -> None:
    """p = 0 in every dropout layer (LoRA's included); the model stays in train mode otherwise."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
