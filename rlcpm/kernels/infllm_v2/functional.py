"""The whole InfLLM v2 pipeline on packed sequences (training / prefill without a cache)."""

from __future__ import annotations

import torch

from rlcpm.kernels.infllm_v2.config import InfLLMv2Config
from rlcpm.kernels.infllm_v2.layout import KeyLayout


def packed_queries(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_seq, q_pos) [T] int64 of packed sequences: every token is a query."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    q_seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)
    q_pos = torch.arange(q_seq.numel(), device=cu_seqlens.device) - cu_seqlens.long()[:-1][q_seq]
    return q_seq, q_pos


def infllm_v2_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    config: InfLLMv2Config,
    scale: float | None = None,
) -> torch.Tensor:
    """Sparse causal attention of packed sequences, every query on the sparse path.

    q [T, Hq, D], k/v [T, Hkv, D] (after RoPE), cu_seqlens [S+1] -> [T, Hq, D]; differentiable
    in q, k, v through stage 2 (selection and compression carry no gradient). The dense_len
    switch is the caller's (rlcpm.models.sparse_attention).
    """
    from rlcpm.kernels.infllm_v2 import block_sparse_attention, compress_keys, select_blocks

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_seq, q_pos = packed_queries(cu_seqlens)
    kc1, cu1 = compress_keys(k, cu_seqlens, config.kernel_size, config.kernel_stride)
    kc2, cu2 = compress_keys(k, cu_seqlens, config.coarse_kernel_size, config.coarse_kernel_stride)
    block_idx = select_blocks(q, q_seq, q_pos, kc1, cu1, kc2, cu2, config, scale)
    layout = KeyLayout.packed(cu_seqlens)
    return block_sparse_attention(q, k, v, layout, q_seq, q_pos, block_idx, config.block_size, scale)
