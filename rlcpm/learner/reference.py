"""The reference policy pi_ref of the KL term and of DPO.

Either a frozen copy of the initial policy (optionally refreshed from the policy every K steps,
`algorithm.ref_refresh_every`), or — with LoRA — the policy itself with its adapters disabled,
which is exactly the base model and costs no second copy in memory.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from rlcpm.errors import TrainingError
from rlcpm.learner.lora import adapters_disabled
from rlcpm.learner.packing import PackedMicroBatch
from rlcpm.learner.policy_head import PolicyWithLogprobHead, SamplingSpec


class ReferencePolicy:
    """pi_ref log-probs for packed micro-batches (no gradient)."""

    def __init__(self, policy_root: PolicyWithLogprobHead, *, uses_lora: bool, can_refresh: bool = False):
        self.uses_lora = uses_lora
        if uses_lora and can_refresh:
            raise TrainingError(
                "algorithm.ref_refresh_every needs a separate reference copy, but with learner.lora the "
                "reference is the base model (adapters disabled); unset one of the two"
            )
        self.frozen: PolicyWithLogprobHead | None = None
        if not uses_lora:
            self.frozen = copy.deepcopy(policy_root).eval()
            self.frozen.requires_grad_(False)
        self.num_refreshes = 0

    def shard(self, shard_fn: Callable[[PolicyWithLogprobHead], nn.Module]) -> None:
        """Apply the same FSDP2 sharding as the policy's to the frozen copy."""
        if self.frozen is not None:
            shard_fn(self.frozen)

    @torch.no_grad()
    def logprobs(
        self, policy_root: PolicyWithLogprobHead, micro_batch: PackedMicroBatch, sampling: SamplingSpec
    ) -> torch.Tensor:
        """log pi_ref of micro_batch.targets: [N] float32."""
        if self.frozen is None:
            with adapters_disabled(policy_root):
                return policy_root(micro_batch, sampling)[0]
        return self.frozen(micro_batch, sampling)[0]

    @torch.no_grad()
    def refresh(self, policy_root: PolicyWithLogprobHead) -> None:
        """pi_ref <- pi_theta (shard by shard when sharded: both are sharded alike)."""
        if self.frozen is None:
            raise TrainingError("a LoRA reference (adapters disabled) cannot be refreshed")
        for ref_param, param in zip(self.frozen.parameters(), policy_root.parameters()):
            ref_param.copy_(param)
        self.num_refreshes += 1
