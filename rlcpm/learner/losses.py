"""The GRPO-family clipped policy objective (SPECS §1), plus re-exports of the DPO and SFT losses.

    r_t   = pi_theta(o_t) / pi_{theta_c(t)}(o_t)      per-token ratio against the BEHAVIOUR log-prob
                                                     of the policy version c(t) that sampled o_t
                                                     (chunk-level importance sampling, MiniCPM4)
    l_t   = max(-r_t A, -clip(r_t, 1 - eps_low, 1 + eps_high) A)          PPO clip, clip-higher (DAPO)
    l_t   = min(l_t, -c A)                    for A < 0 only               dual-clip (arXiv 1912.09729)
    l_t  += kl_coef * KL_t(pi_theta || pi_ref) - entropy_coef * H_t
    loss  = aggregate(l, mask)               token-mean / seq-mean-token-mean / seq-mean-token-sum

GSPO (arXiv 2507.18071, `ratio_level="sequence"`) replaces r_t by the length-normalised
sequence ratio s_i = exp(mean_t log r_t) in value, keeping grad s_it = s_i * grad log pi_theta(o_t).
"""

from __future__ import annotations

import torch

from rlcpm.errors import TrainingError
from rlcpm.learner.aggregation import aggregate_loss
from rlcpm.learner.dpo import dpo_loss
from rlcpm.learner.kl import kl_estimate
from rlcpm.learner.sft import sft_loss

__all__ = ["dpo_loss", "policy_loss", "sft_loss"]


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float | None = 3.0,
    agg: str = "token-mean",
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    ratio_level: str = "token",
    num_tokens: float | None = None,
    num_sequences: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss (to minimise) of the GRPO family.

    Args:
        logprobs: [B, T] log pi_theta(o_t) of the current policy (with gradient).
        old_logprobs: [B, T] behaviour log-probs, each under the policy version that sampled it.
        advantages: [B] (broadcast to every token) or [B, T].
        mask: [B, T] loss mask; 0 on prompt/padding and on responses filtered from the loss.
        eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high].
        dual_clip: c > 1 bounding the loss of A < 0 tokens by -c * A; None disables it.
        agg: "token-mean", "seq-mean-token-mean" or "seq-mean-token-sum" (rlcpm.learner.aggregation).
        ref_logprobs: [B, T] reference log-probs for the KL term (with kl_coef > 0).
        kl_estimator: "k1", "k2" or "k3" (rlcpm.learner.kl).
        entropy: [B, T] per-token entropy of pi_theta, for the bonus -entropy_coef * H.
        ratio_level: "token" (PPO/GRPO) or "sequence" (GSPO).
        num_tokens, num_sequences: the whole batch's denominators when this call sees one
            micro-batch (see rlcpm.learner.aggregation.batch_denominators).

    Returns:
        (loss, stats): stats are detached scalars averaged over this call's loss tokens, plus
        `num_tokens` (this call's loss-token count, the weight for averaging across micro-batches).
    """
    if ratio_level not in ("token", "sequence"):
        raise TrainingError(f"unknown ratio_level {ratio_level!r}; choose 'token' or 'sequence' (GSPO)")
    if kl_coef != 0.0 and ref_logprobs is None:
        raise TrainingError(f"kl_coef={kl_coef} needs ref_logprobs (the reference policy's [B, T] log-probs)")
    is_loss_token = mask > 0  # [B, T]
    weight = is_loss_token.to(logprobs.dtype)
    if advantages.dim() == 1:
        advantages = advantages[:, None]  # [B, 1]
    advantages = advantages.to(logprobs.dtype).expand_as(logprobs)  # [B, T]

    # Padding and filtered tokens may hold -inf or garbage: keep them out of exp() and of gradients.
    log_ratio = torch.where(is_loss_token, logprobs - old_logprobs.to(logprobs.dtype), 0.0)  # [B, T]
    if ratio_level == "sequence":
        sequence_log_ratio = log_ratio.sum(-1) / weight.sum(-1).clamp(min=1.0)  # [B]
        # 0 in value, d log pi_theta(o_t) in gradient; 0 for a -inf log-prob (-inf - -inf is NaN)
        grad_carrier = torch.where(torch.isfinite(logprobs), logprobs - logprobs.detach(), 0.0)
        log_ratio = sequence_log_ratio.detach()[:, None] + grad_carrier
        log_ratio = torch.where(is_loss_token, log_ratio, 0.0)
    ratio = torch.exp(log_ratio)  # [B, T]

    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = torch.maximum(unclipped, clipped)  # [B, T]
    is_clipped = clipped > unclipped
    is_dual_clipped = torch.zeros_like(is_loss_token)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise TrainingError(f"dual_clip must be > 1 (or None to disable), got {dual_clip}")
        bound = -dual_clip * advantages  # > 0 where A < 0
        is_dual_clipped = (advantages < 0) & (per_token > bound)
        per_token = torch.where(is_dual_clipped, bound, per_token)
    policy_per_token = per_token

    stats: dict[str, torch.Tensor] = {}
    if ref_logprobs is not None and kl_coef != 0.0:
        kl = kl_estimate(
            torch.where(is_loss_token, logprobs, 0.0),
            torch.where(is_loss_token, ref_logprobs, 0.0),
            kl_estimator,
        )
        per_token = per_token + kl_coef * kl
        stats["kl"] = _masked_mean(kl, weight)
    if entropy is not None and entropy_coef != 0.0:
        per_token = per_token - entropy_coef * torch.where(is_loss_token, entropy, 0.0)
    if entropy is not None:
        stats["entropy"] = _masked_mean(entropy, weight)

    loss = aggregate_loss(per_token, weight, agg, num_tokens=num_tokens, num_sequences=num_sequences)
    positive = advantages > 0
    stats.update(
        policy_loss=_masked_mean(policy_per_token, weight),
        ratio_mean=_masked_mean(ratio, weight),
        ratio_max=(
            torch.where(is_loss_token, ratio, 0.0).max() if is_loss_token.any() else ratio.new_zeros(())
        )
        .detach()
        .float(),
        clip_frac_low=_masked_mean((is_clipped & ~positive).to(weight.dtype), weight),
        clip_frac_high=_masked_mean((is_clipped & positive).to(weight.dtype), weight),
        dual_clip_frac=_masked_mean(is_dual_clipped.to(weight.dtype), weight),
        approx_kl_behaviour=_masked_mean(
            kl_estimate(log_ratio.detach(), torch.zeros_like(log_ratio), "k3"), weight
        ),
        num_tokens=weight.sum().detach(),
    )
    return loss, stats


def _masked_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    values = torch.where(weight > 0, values.detach().to(weight.dtype), 0.0)
    return (values.sum() / weight.sum().clamp(min=1.0)).float()
