"""KL estimators between the policy and a reference, from samples of the policy (Schulman, 2020).

With log r = log pi_ref(o_t) - log pi_theta(o_t) for a token o_t sampled from pi_theta:

    k1 = -log r                      unbiased, high variance, can be negative
    k2 = (log r)^2 / 2               biased, low variance, >= 0
    k3 = (r - 1) - log r             unbiased, low variance, >= 0   (GRPO's "low-variance" KL)

Each maps log-probs of the same shape ([B, T] or [N]) to a per-token estimate of that shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlcpm.errors import TrainingError

# exp() of a log-ratio past this bound overflows float32 long before it means anything.
MAX_LOG_RATIO = 20.0


def _log_ratio(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    # Equal log-probs give 0, -inf and -inf included: a token outside both policies' top-k / top-p
    # sets (both 0 probability) would otherwise make every estimator NaN.
    log_ratio = torch.where(ref_logprobs == logprobs, 0.0, ref_logprobs - logprobs)
    return log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log pi_theta - log pi_ref."""
    return -_log_ratio(logprobs, ref_logprobs)


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = (log pi_ref - log pi_theta)^2 / 2."""
    return 0.5 * _log_ratio(logprobs, ref_logprobs).square()


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = exp(log pi_ref - log pi_theta) - (log pi_ref - log pi_theta) - 1 (>= 0, == 0 iff equal)."""
    log_ratio = _log_ratio(logprobs, ref_logprobs)
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL(pi_theta || pi_ref) estimate with the named estimator (k1, k2 or k3)."""
    try:
        fn = KL_ESTIMATORS[estimator]
    except KeyError:
        raise TrainingError(
            f"unknown kl_estimator {estimator!r}; choose one of {sorted(KL_ESTIMATORS)}"
        ) from None
    return fn(logprobs, ref_logprobs)
