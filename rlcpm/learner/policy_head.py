"""The policy with its memory-lean log-prob head, as one module (the FSDP2 root).

Everything a training forward needs happens inside this module's `forward` — the packed decoder
pass AND the chunked log-softmax over the LM head — so FSDP2 has the root's parameters (LM head
included) gathered for exactly that span, and hooks the backward to its outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rlcpm.kernels.cpu_gemm import OneDNNLinear
from rlcpm.learner.logprobs import target_logprobs
from rlcpm.learner.packing import PackedMicroBatch
from rlcpm.models.metadata import AttentionMetadata


@dataclass(frozen=True)
class SamplingSpec:
    """The distribution log-probs are taken under: the engine's temperature / top-k / top-p."""

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0


class PolicyWithLogprobHead(nn.Module):
    """`policy` (rlcpm CausalLM, maybe with LoRA) -> per-target log-probs and entropies."""

    def __init__(self, policy: nn.Module, chunk_tokens: int = 1024):
        super().__init__()
        self.policy = policy
        self.chunk_tokens = chunk_tokens

    def forward(
        self, micro_batch: PackedMicroBatch, sampling: SamplingSpec = SamplingSpec()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logprobs [N], entropy [N]) float32 of micro_batch.targets at micro_batch.score_index."""
        meta = AttentionMetadata.packed(
            micro_batch.seq_lens, device=micro_batch.input_ids.device, prefix_seq=micro_batch.segment_prefix
        )
        hidden = self.policy(
            micro_batch.input_ids, micro_batch.positions, meta=meta, return_hidden=True
        )  # [T, H]
        return target_logprobs(
            hidden[micro_batch.score_index],  # [N, H]
            self.policy.lm_head.weight,
            micro_batch.targets,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            chunk_tokens=self.chunk_tokens,
            onednn=isinstance(self.policy.lm_head, OneDNNLinear),  # the learner's cpu_gemm choice
        )
