"""Block-sparse decode attention: one new query token per sequence over the paged KV cache.

Same semantics as stage 2 (rlcpm.kernels.infllm_v2.block_sparse_attn) with q_seq = 0..S-1 and
keys in the paged cache. The Triton kernel (decode_triton) splits each query's selected
blocks across programs, flash-decoding style, and merges the partial softmaxes by their
log-sum-exp, so a handful of sequences still fills the GPU at long context. The reference
gathers the selected blocks only: K*B keys per KV head instead of the whole context.
"""

from __future__ import annotations

import torch

from rlcpm.kernels.infllm_v2.block_sparse_attn import block_sparse_attention_reference
from rlcpm.kernels.infllm_v2.layout import KeyLayout


def sparse_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: KeyLayout,
    q_pos: torch.Tensor,
    block_idx: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """q [S, Hq, D] (sequence s's new token at position q_pos[s]), k/v_cache [slots, Hkv, D],
    block_idx [S, Hkv, K] -> out [S, Hq, D]."""
    q_seq = torch.arange(q.shape[0], device=q.device)
    return block_sparse_attention_reference(
        q, k_cache, v_cache, layout, q_seq, q_pos, block_idx, block_size, scale
    )
