"""Triton kernels for stage 1 (same signature as stage1.block_scores_reference).

Two launches over query tiles (up to TILE tokens of one sequence x the G heads of a KV group
= M rows sharing every compressed-key load):

1. `_lse_kernel`: lse[t, g] over the visible lse kernels (Kc2, or Kc1 for the exact variant),
   online, in the log2 domain; +inf when none is visible.
2. `_block_score_kernel`: for NB blocks at a time, p = exp2(s - lse) of their r "inner" kernels
   (j = r*b .. r*b + r - 1) and of their boundary kernel j = r*b - 1, summed over the group,
   max-pooled per block, then forced (+inf) / future (-inf) as in the reference.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from rlcpm.errors import RlcpmError
from rlcpm.kernels.infllm_v2.config import InfLLMv2Config
from rlcpm.kernels.infllm_v2.tiles import sequence_tiles
from rlcpm.kernels.triton_utils import check_inputs, dot, dot_precision, interpreting, next_pow2

_LOG2E = 1.4426950408889634
_ROWS = 64  # target rows (tokens x group heads) per program
_NB = 16  # blocks per block-score program


@triton.jit
def _visible_count(pos, count, KERNEL: tl.constexpr, STRIDE: tl.constexpr):
    """Kernels j with STRIDE*j + KERNEL - 1 <= pos, capped at the sequence's count."""
    n = tl.where(pos >= KERNEL - 1, (pos - (KERNEL - 1)) // STRIDE + 1, 0)
    return tl.minimum(n, count)


@triton.jit
def _load_q_rows(
    Q, tok, g, h, row_mask, stride_qt, stride_qh, offs_d, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr
):
    ptrs = Q + tok[:, None].to(tl.int64) * stride_qt + (h * GROUP + g)[:, None] * stride_qh + offs_d[None, :]
    return tl.load(ptrs, mask=row_mask[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _lse_kernel(
    Q,
    Q_SEQ,
    Q_POS,
    KL,
    CU_L,
    TILE_START,
    TILE_END,
    LSE,
    stride_qt,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_lt,
    scale_log2,
    GROUP: tl.constexpr,
    GP: tl.constexpr,
    TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KERNEL: tl.constexpr,
    STRIDE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    t0 = tl.load(TILE_START + tile)
    t1 = tl.load(TILE_END + tile)
    offs_m = tl.arange(0, TILE * GP)
    tok = t0 + offs_m // GP
    g = offs_m % GP
    row_mask = (tok < t1) & (g < GROUP)
    seq = tl.load(Q_SEQ + t0)
    start = tl.load(CU_L + seq)
    count = tl.load(CU_L + seq + 1) - start
    pos = tl.load(Q_POS + tok, mask=row_mask, other=-1)
    n_vis = _visible_count(pos, count, KERNEL, STRIDE)  # [M]
    n_max = tl.max(n_vis, axis=0)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_q_rows(Q, tok, g, h, row_mask, stride_qt, stride_qh, offs_d, HEAD_DIM, GROUP)
    m_i = tl.full([TILE * GP], float("-inf"), tl.float32)
    l_i = tl.zeros([TILE * GP], tl.float32)
    for n0 in range(0, n_max, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kmask = offs_n < n_max
        kc = tl.load(
            KL + (start + offs_n)[:, None].to(tl.int64) * stride_kn + h * stride_kh + offs_d[None, :],
            mask=kmask[:, None] & (offs_d < HEAD_DIM)[None, :],
            other=0.0,
        )
        s = dot(q, tl.trans(kc), UPCAST, PRECISION) * scale_log2
        s = tl.where(offs_n[None, :] < n_vis[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("inf"))
    tl.store(LSE + tok.to(tl.int64) * stride_lt + h * GROUP + g, lse, mask=row_mask)


@triton.jit
def _block_score_kernel(
    Q,
    Q_SEQ,
    Q_POS,
    KC,
    CU_C,
    TILE_START,
    TILE_END,
    LSE,
    OUT,
    stride_qt,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_lt,
    stride_ot,
    stride_oh,
    scale_log2,
    num_blocks,
    GROUP: tl.constexpr,
    GP: tl.constexpr,
    TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KERNEL: tl.constexpr,
    STRIDE: tl.constexpr,
    RATIO: tl.constexpr,
    NB: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    INIT_BLOCKS: tl.constexpr,
    LOCAL_BLOCKS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    b0 = tl.program_id(2) * NB
    t0 = tl.load(TILE_START + tile)
    t1 = tl.load(TILE_END + tile)
    offs_m = tl.arange(0, TILE * GP)
    tok = t0 + offs_m // GP
    g = offs_m % GP
    row_mask = (tok < t1) & (g < GROUP)
    seq = tl.load(Q_SEQ + t0)
    start = tl.load(CU_C + seq)
    count = tl.load(CU_C + seq + 1) - start
    pos = tl.load(Q_POS + tok, mask=row_mask, other=-1)
    n_vis = _visible_count(pos, count, KERNEL, STRIDE)  # [M]
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = (offs_d < HEAD_DIM)[None, :]
    q = _load_q_rows(Q, tok, g, h, row_mask, stride_qt, stride_qh, offs_d, HEAD_DIM, GROUP)
    lse = tl.load(LSE + tok.to(tl.int64) * stride_lt + h * GROUP + g, mask=row_mask, other=float("inf"))

    # Inner kernels j = RATIO*b + u (u < RATIO) of the NB blocks, flattened [NB*RATIO].
    j_in = b0 * RATIO + tl.arange(0, NB * RATIO)
    kc = tl.load(
        KC + (start + j_in)[:, None].to(tl.int64) * stride_kn + h * stride_kh + offs_d[None, :],
        mask=(j_in < count)[:, None] & d_mask,
        other=0.0,
    )
    s = dot(q, tl.trans(kc), UPCAST, PRECISION) * scale_log2
    p = tl.where((j_in[None, :] < n_vis[:, None]) & row_mask[:, None], tl.exp2(s - lse[:, None]), 0.0)
    p = tl.sum(tl.reshape(p, (TILE, GP, NB * RATIO)), axis=1)  # [TILE, NB*RATIO] summed over the group
    inner = tl.max(tl.reshape(p, (TILE, NB, RATIO)), axis=2)  # [TILE, NB]
    # Boundary kernel j = RATIO*b - 1 of each block (the last inner kernel of block b - 1).
    j_edge = (b0 + tl.arange(0, NB)) * RATIO - 1
    kc = tl.load(
        KC + (start + j_edge)[:, None].to(tl.int64) * stride_kn + h * stride_kh + offs_d[None, :],
        mask=((j_edge >= 0) & (j_edge < count))[:, None] & d_mask,
        other=0.0,
    )
    s = dot(q, tl.trans(kc), UPCAST, PRECISION) * scale_log2
    visible = (j_edge[None, :] >= 0) & (j_edge[None, :] < n_vis[:, None]) & row_mask[:, None]
    p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
    edge = tl.sum(tl.reshape(p, (TILE, GP, NB)), axis=1)  # [TILE, NB]
    pooled = tl.maximum(inner, edge)

    offs_t = tl.arange(0, TILE)
    tok_t = t0 + offs_t
    pos_t = tl.load(Q_POS + tok_t, mask=tok_t < t1, other=0)
    qb = (pos_t // BLOCK_SIZE)[:, None]
    b = (b0 + tl.arange(0, NB))[None, :]
    forced = (b < INIT_BLOCKS) | ((b >= qb - LOCAL_BLOCKS) & (b <= qb))
    # Future wins over forced: an init block after the query's own block is not selectable.
    score = tl.where(b > qb, float("-inf"), tl.where(forced, float("inf"), pooled))
    out_ptrs = OUT + tok_t[:, None].to(tl.int64) * stride_ot + h * stride_oh + b
    tl.store(out_ptrs, score, mask=(tok_t < t1)[:, None] & (b < num_blocks))


def block_scores_triton(
    q: torch.Tensor,
    q_seq: torch.Tensor,
    q_pos: torch.Tensor,
    kc1: torch.Tensor,
    cu_c1: torch.Tensor,
    kc2: torch.Tensor,
    cu_c2: torch.Tensor,
    num_blocks: int,
    config: InfLLMv2Config,
    scale: float,
) -> torch.Tensor:
    """Block scores [Tq, Hkv, num_blocks] float32 (see stage1.block_scores_reference)."""
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    check_inputs("block_scores", dtypes, q=q, kc1=kc1, kc2=kc2)
    ratio = config.pool_ratio
    if ratio & (ratio - 1):
        raise RlcpmError(f"block_scores kernel: block_size / kernel_stride ({ratio}) must be a power of two")
    num_q, num_heads, head_dim = q.shape
    num_kv = kc1.shape[1]
    group = num_heads // num_kv
    out = torch.empty(num_q, num_kv, num_blocks, dtype=torch.float32, device=q.device)
    if num_q == 0:
        return out
    gp = next_pow2(group)
    tile = max(1, _ROWS // gp)
    num_seqs = cu_c1.numel() - 1
    tile_start, tile_end = sequence_tiles(q_seq, num_seqs, tile)
    q = q.contiguous()
    lse = torch.empty(num_q, num_heads, dtype=torch.float32, device=q.device)
    if config.lse_approx:
        lse_keys, lse_cu = kc2.contiguous(), cu_c2
        lse_kernel, lse_stride = config.coarse_kernel_size, config.coarse_kernel_stride
    else:
        lse_keys, lse_cu = kc1.contiguous(), cu_c1
        lse_kernel, lse_stride = config.kernel_size, config.kernel_stride
    kc1 = kc1.contiguous()
    common = dict(
        GROUP=group,
        GP=gp,
        TILE=tile,
        HEAD_DIM=head_dim,
        BLOCK_D=next_pow2(head_dim, 16),
        UPCAST=interpreting(),
        PRECISION=dot_precision(q.dtype),
    )
    scale_log2 = scale * _LOG2E
    q_seq32, q_pos32 = q_seq.to(torch.int32).contiguous(), q_pos.to(torch.int32).contiguous()
    _lse_kernel[(tile_start.numel(), num_kv)](
        q,
        q_seq32,
        q_pos32,
        lse_keys,
        lse_cu.to(torch.int32),
        tile_start,
        tile_end,
        lse,
        q.stride(0),
        q.stride(1),
        lse_keys.stride(0),
        lse_keys.stride(1),
        lse.stride(0),
        scale_log2,
        KERNEL=lse_kernel,
        STRIDE=lse_stride,
        BLOCK_N=64,
        **common,
    )
    grid = (tile_start.numel(), num_kv, math.ceil(num_blocks / _NB))
    _block_score_kernel[grid](
        q,
        q_seq32,
        q_pos32,
        kc1,
        cu_c1.to(torch.int32),
        tile_start,
        tile_end,
        lse,
        out,
        q.stride(0),
        q.stride(1),
        kc1.stride(0),
        kc1.stride(1),
        lse.stride(0),
        out.stride(0),
        out.stride(1),
        scale_log2,
        num_blocks,
        KERNEL=config.kernel_size,
        STRIDE=config.kernel_stride,
        RATIO=ratio,
        NB=_NB,
        BLOCK_SIZE=config.block_size,
        INIT_BLOCKS=config.init_blocks,
        LOCAL_BLOCKS=config.local_blocks,
        **common,
    )
    return out
