"""Triton flash-decoding for InfLLM v2 (same signature as decode.sparse_decode_attention_reference).

Each (sequence, KV head) splits its selected blocks over `num_splits` programs of the stage-2
forward kernel (a one-token tile: M = the G heads of the group); the partial softmaxes are
merged by their log-sum-exp.
"""

from __future__ import annotations

import torch

from rlcpm.kernels.infllm_v2.block_sparse_fwd_triton import (
    TilePlan,
    check_block_size,
    launch_forward,
    merge_splits,
)
from rlcpm.kernels.infllm_v2.layout import KeyLayout
from rlcpm.kernels.triton_utils import check_inputs

_TARGET_PROGRAMS = 512  # enough programs to fill a large GPU
_MIN_BLOCKS_PER_SPLIT = 4


def num_decode_splits(num_seqs: int, num_kv_heads: int, num_selected: int) -> int:
    wanted = -(-_TARGET_PROGRAMS // max(1, num_seqs * num_kv_heads))
    return max(1, min(wanted, -(-num_selected // _MIN_BLOCKS_PER_SPLIT)))


def sparse_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: KeyLayout,
    q_pos: torch.Tensor,
    block_idx: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """q [S, Hq, D], k/v_cache [slots, Hkv, D], block_idx [S, Hkv, K] -> out [S, Hq, D]."""
    check_inputs(
        "sparse_decode_attention", (torch.float32, torch.bfloat16, torch.float16), q=q, k=k_cache, v=v_cache
    )
    check_block_size("sparse_decode_attention", block_size)
    num_seqs, num_heads, _ = q.shape
    num_kv = k_cache.shape[1]
    q_seq = torch.arange(num_seqs, dtype=torch.int32, device=q.device)
    block_idx = block_idx.to(torch.int32).contiguous()
    plan = TilePlan(q_seq, num_seqs, block_idx, num_heads // num_kv, tile_len=1)
    splits = num_decode_splits(num_seqs, num_kv, block_idx.shape[-1])
    out, lse = launch_forward(
        q.contiguous(),
        k_cache,
        v_cache,
        layout,
        q_seq,
        q_pos.to(torch.int32).contiguous(),
        block_idx,
        block_size,
        scale,
        plan,
        num_splits=splits,
    )
    return out[0] if splits == 1 else merge_splits(out, lse, q.dtype)
