"""The learner: GRPO / DPO / SFT losses, log-probs, packing, schedules, checkpoints, training processes.

Losses are pure functions of tensors (rlcpm.learner.losses); `Learner` is one training process
and `LearnerGroup` a set of Ray actors doing data parallelism over torch.distributed (FSDP2).
"""

from rlcpm.learner.advantages import compute_advantages, kl_penalized_rewards
from rlcpm.learner.batch import PreferencePair, RLBatch, RLSequence, SFTSequence
from rlcpm.learner.dpo import dpo_loss
from rlcpm.learner.logprobs import target_logprobs
from rlcpm.learner.losses import policy_loss
from rlcpm.learner.schedules import build_lr_scheduler, lr_multiplier
from rlcpm.learner.sft import sft_loss

__all__ = [
    "PreferencePair",
    "RLBatch",
    "RLSequence",
    "SFTSequence",
    "build_lr_scheduler",
    "compute_advantages",
    "dpo_loss",
    "kl_penalized_rewards",
    "lr_multiplier",
    "policy_loss",
    "sft_loss",
    "target_logprobs",
]
