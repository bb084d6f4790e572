"""The DPO family of preference losses (Rafailov et al., arXiv 2305.18290).

Per pair (chosen y_w, rejected y_l), with sequence log-probs summed over response tokens,

    h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]

    sigmoid  l = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)    DPO; eps > 0: cDPO
                                                                          (conservative DPO, label smoothing)
    hinge    l = max(0, 1 - beta h)                                        SLiC (arXiv 2305.10425)
    ipo      l = (h_bar - 1 / (2 beta))^2                                  IPO (arXiv 2310.12036, eq. 17)
             with h_bar the same difference of LENGTH-NORMALISED log-ratios (each side divided by
             its number of response tokens), as TRL and the IPO authors compute it.

The loss is the mean over pairs; pass `num_pairs` (the whole batch's) when a call sees one
micro-batch, so that micro-batch losses sum to the batch loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from rlcpm.errors import TrainingError


def _sigmoid(h: torch.Tensor, beta: float, label_smoothing: float, h_bar: torch.Tensor) -> torch.Tensor:
    return -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def _hinge(h: torch.Tensor, beta: float, label_smoothing: float, h_bar: torch.Tensor) -> torch.Tensor:
    return torch.relu(1.0 - beta * h)


def _ipo(h: torch.Tensor, beta: float, label_smoothing: float, h_bar: torch.Tensor) -> torch.Tensor:
    return (h_bar - 1.0 / (2.0 * beta)).square()


DPO_LOSSES: dict[str, Callable[..., torch.Tensor]] = {"sigmoid": _sigmoid, "hinge": _hinge, "ipo": _ipo}


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    num_pairs: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO-family loss of a batch of pairs.

    Args:
        chosen_logps, rejected_logps: [P] summed response log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: [P] the same under the reference (no gradient).
        beta: the KL-regularisation strength (IPO's tau).
        loss_type: "sigmoid" (with label_smoothing > 0: cDPO), "hinge" or "ipo".
        chosen_lengths, rejected_lengths: [P] response token counts (needed by ipo).
        num_pairs: the whole batch's number of pairs when this call sees a micro-batch.

    Returns:
        (loss, stats) with stats rewards_chosen / rewards_rejected (beta * log-ratio), margin,
        accuracy (chosen reward > rejected reward), all detached means over this call's pairs.
    """
    if loss_type not in DPO_LOSSES:
        raise TrainingError(f"unknown algorithm.loss_type {loss_type!r}; choose one of {sorted(DPO_LOSSES)}")
    if label_smoothing and loss_type != "sigmoid":
        raise TrainingError(f"label_smoothing applies to loss_type 'sigmoid' only (cDPO), not {loss_type!r}")
    chosen_logratio = chosen_logps - ref_chosen_logps.detach()  # [P]
    rejected_logratio = rejected_logps - ref_rejected_logps.detach()  # [P]
    h = chosen_logratio - rejected_logratio  # [P]
    h_bar = h
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise TrainingError("ipo needs chosen_lengths and rejected_lengths (response token counts)")
        h_bar = chosen_logratio / chosen_lengths.clamp(min=1) - rejected_logratio / rejected_lengths.clamp(
            min=1
        )
    per_pair = DPO_LOSSES[loss_type](h, beta, label_smoothing, h_bar)  # [P]
    denominator = per_pair.numel() if num_pairs is None else num_pairs
    loss = per_pair.sum() / max(float(denominator), 1.0)

    rewards_chosen = beta * chosen_logratio.detach()
    rewards_rejected = beta * rejected_logratio.detach()
    stats = {
        "rewards_chosen": rewards_chosen.mean(),
        "rewards_rejected": rewards_rejected.mean(),
        "margin": (rewards_chosen - rewards_rejected).mean(),
        "accuracy": (rewards_chosen > rewards_rejected).float().mean(),
        "num_pairs": torch.tensor(float(per_pair.numel())),
    }
    return loss, stats
