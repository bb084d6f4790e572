"""How one packed micro-batch becomes a loss, per algorithm (GRPO family, SFT, DPO family).

Each builder closes over what the WHOLE batch knows (its global denominators, behaviour and
reference log-probs, advantages) and returns a `LossFn`:

    (micro_batch, logprobs [N], entropy [N]) -> (loss, stats)

with logprobs / entropy the flat per-scored-token outputs of the policy's forward; the builder
lays them out as [S, R_max] (PackedMicroBatch.to_padded) for the loss functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from rlcpm.config import DPOConfig, GRPOConfig
from rlcpm.learner.batch import PreferencePair, RLBatch
from rlcpm.learner.dpo import dpo_loss
from rlcpm.learner.losses import policy_loss
from rlcpm.learner.packing import PackedMicroBatch
from rlcpm.learner.sft import sft_loss

LossFn = Callable[[PackedMicroBatch, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]


def grpo_objective(algo: GRPOConfig, batch: RLBatch) -> LossFn:
    """policy_loss with the batch's denominators, per-token behaviour log-probs and (KL in loss) pi_ref."""
    sequences = batch.sequences
    num_tokens, num_sequences = batch.num_loss_tokens, batch.num_loss_sequences
    use_kl = algo.kl_coef > 0 and algo.kl_in == "loss"
    behaviour = [s.behaviour_logprobs for s in sequences]
    ref = [s.ref_logprobs for s in sequences] if use_kl else None

    def loss_fn(mb: PackedMicroBatch, logprobs: torch.Tensor, entropy: torch.Tensor):
        device = logprobs.device
        advantages = torch.tensor([sequences[i].advantage for i in mb.sequence_ids], device=device)  # [S]
        return policy_loss(
            mb.to_padded(logprobs),  # [S, R]
            mb.gather(behaviour).to(device),
            advantages,
            mb.response_mask().to(device),
            eps_low=algo.eps_low,
            eps_high=algo.eps_high,
            dual_clip=algo.dual_clip,
            agg=algo.loss_agg,
            ref_logprobs=mb.gather(ref).to(device) if ref is not None else None,
            kl_coef=algo.kl_coef if use_kl else 0.0,
            kl_estimator=algo.kl_estimator,
            entropy=mb.to_padded(entropy),
            entropy_coef=algo.entropy_coef,
            ratio_level=algo.ratio_level,
            num_tokens=num_tokens,
            num_sequences=num_sequences,
        )

    return loss_fn


def sft_objective(num_tokens: int) -> LossFn:
    """NLL of the response tokens, divided by the batch's `num_tokens`."""

    def loss_fn(mb: PackedMicroBatch, logprobs: torch.Tensor, entropy: torch.Tensor):
        return sft_loss(mb.to_padded(logprobs), mb.response_mask().to(logprobs.device), num_tokens=num_tokens)

    return loss_fn


def flatten_pairs(pairs: Sequence[PreferencePair]) -> tuple[list[list[int]], list[list[int]]]:
    """[(x, y_w, y_l)] -> prompts [x, x, ...], responses [y_w, y_l, ...] (chosen at even indices)."""
    prompts, responses = [], []
    for pair in pairs:
        prompts += [pair.prompt_token_ids, pair.prompt_token_ids]
        responses += [pair.chosen_token_ids, pair.rejected_token_ids]
    return prompts, responses


def dpo_objective(algo: DPOConfig, pairs: Sequence[PreferencePair]) -> LossFn:
    """dpo_loss over the pairs of a micro-batch (packed as chosen, rejected, chosen, ...).

    Needs every pair's reference log-probs filled in; the mean is over all `len(pairs)` pairs.
    """
    _, responses = flatten_pairs(pairs)

    def loss_fn(mb: PackedMicroBatch, logprobs: torch.Tensor, entropy: torch.Tensor):
        device = logprobs.device
        sequence_logps = mb.to_padded(logprobs).sum(dim=-1)  # [2P'] log pi(y|x)
        pair_ids = [i // 2 for i in mb.sequence_ids[0::2]]
        ref = torch.tensor(
            [[pairs[i].ref_chosen_logp, pairs[i].ref_rejected_logp] for i in pair_ids], device=device
        )
        lengths = torch.tensor([len(responses[i]) for i in mb.sequence_ids], device=device).float()
        return dpo_loss(
            sequence_logps[0::2],
            sequence_logps[1::2],
            ref[:, 0],
            ref[:, 1],
            beta=algo.beta,
            loss_type=algo.loss_type,
            label_smoothing=algo.label_smoothing,
            chosen_lengths=lengths[0::2],
            rejected_lengths=lengths[1::2],
            num_pairs=len(pairs),
        )

    return loss_fn
