"""Triton forward machinery of stage 2 (shared by training/prefill and decode).

A program takes a query tile (up to TILE tokens of one sequence x the G query heads of one KV
head = M rows) and walks the union of the tile's selected blocks: each block is loaded once for
the tile, and a row ignores the blocks its own token did not select (membership is tested
against the token's index list) and the keys after its position. Softmax is online in the log2
domain (flash-attention style) and the kernel writes the normalised output and its lse.

A program may take only a range of the union (`SPLIT_LEN`): with several splits the partial
results are combined by `merge_splits` (flash-decoding), which is how the decode kernel
(decode_triton) spreads one token's blocks over many programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlcpm.errors import RlcpmError
from rlcpm.kernels.infllm_v2.layout import KeyLayout
from rlcpm.kernels.infllm_v2.tiles import sequence_tiles, tile_block_union
from rlcpm.kernels.triton_utils import dot, dot_precision, interpreting, next_pow2

LOG2E = 1.4426950408889634
_MIN_DOT_ROWS = 16  # tl.dot needs M >= 16


def check_block_size(op: str, block_size: int) -> None:
    """The kernels load one attention block of keys at a time (tl.arange(0, block_size)), so
    block_size must be a power of two (InfLLMv2Config and the CPU reference take any multiple
    of kernel_stride): a clear error instead of a Triton compile error."""
    if block_size < 1 or block_size & (block_size - 1):
        raise RlcpmError(
            f"{op} kernel: the sparse attention block_size ({block_size}) must be a power of two"
        )


@triton.jit
def tile_rows(
    TILE_START, TILE_END, Q_SEQ, Q_POS, tile, GROUP: tl.constexpr, GP: tl.constexpr, TILE: tl.constexpr
):
    t0 = tl.load(TILE_START + tile)
    t1 = tl.load(TILE_END + tile)
    offs_m = tl.arange(0, TILE * GP)
    tok = t0 + offs_m // GP
    g = offs_m % GP
    row_mask = (tok < t1) & (g < GROUP)
    pos = tl.load(Q_POS + tok, mask=row_mask, other=-1)
    seq = tl.load(Q_SEQ + t0)
    return t0, t1, tok, g, row_mask, pos, seq


@triton.jit
def block_membership(
    IDX, t0, t1, h, b, stride_it, stride_ih, NSEL, GP: tl.constexpr, TILE: tl.constexpr, KP: tl.constexpr
):
    """[TILE*GP] bool: did the row's token select block b?"""
    offs_t = tl.arange(0, TILE)
    offs_k = tl.arange(0, KP)
    idx = tl.load(
        IDX + (t0 + offs_t)[:, None].to(tl.int64) * stride_it + h * stride_ih + offs_k[None, :],
        mask=((t0 + offs_t) < t1)[:, None] & (offs_k < NSEL)[None, :],
        other=-1,
    )
    member = tl.sum((idx == b).to(tl.int32), axis=1) > 0  # [TILE]
    return tl.reshape(tl.broadcast_to(member[:, None], (TILE, GP)), (TILE * GP,))


@triton.jit
def key_rows(CU, TABLE, seq, kpos, stride_tab, PAGED: tl.constexpr, PAGE: tl.constexpr):
    if PAGED:
        page = tl.load(TABLE + seq * stride_tab + kpos // PAGE).to(tl.int64)
        return page * PAGE + kpos % PAGE
    return tl.load(CU + seq).to(tl.int64) + kpos


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    OUT,
    LSE,
    Q_SEQ,
    Q_POS,
    IDX,
    UNION,
    UNION_LEN,
    TILE_START,
    TILE_END,
    CU,
    TABLE,
    stride_qt,
    stride_qh,
    stride_kr,
    stride_kh,
    stride_vr,
    stride_vh,
    stride_os,
    stride_ot,
    stride_oh,
    stride_ls,
    stride_lt,
    stride_it,
    stride_ih,
    stride_ut,
    stride_uh,
    stride_ul,
    stride_tab,
    NSEL,
    scale_log2,
    SPLIT_LEN,
    GROUP: tl.constexpr,
    GP: tl.constexpr,
    TILE: tl.constexpr,
    KP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    t0, t1, tok, g, row_mask, pos, seq = tile_rows(TILE_START, TILE_END, Q_SEQ, Q_POS, tile, GROUP, GP, TILE)
    max_pos = tl.max(pos, axis=0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_mask = (offs_d < HEAD_DIM)[None, :]
    heads = h * GROUP + g
    q = tl.load(
        Q + tok[:, None].to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=row_mask[:, None] & d_mask,
        other=0.0,
    )
    m_i = tl.full([TILE * GP], float("-inf"), tl.float32)
    l_i = tl.zeros([TILE * GP], tl.float32)
    acc = tl.zeros([TILE * GP, BLOCK_D], tl.float32)
    num_union = tl.load(UNION_LEN + tile * stride_ul + h)
    for u in range(split * SPLIT_LEN, tl.minimum((split + 1) * SPLIT_LEN, num_union)):
        b = tl.load(UNION + tile * stride_ut + h * stride_uh + u)
        member = block_membership(IDX, t0, t1, h, b, stride_it, stride_ih, NSEL, GP, TILE, KP)
        kpos = b * BLOCK_N + offs_n
        kvalid = kpos <= max_pos
        kpos_safe = tl.where(kvalid, kpos, 0)
        rows = key_rows(CU, TABLE, seq, kpos_safe, stride_tab, PAGED, PAGE)
        k = tl.load(
            K + rows[:, None] * stride_kr + h * stride_kh + offs_d[None, :],
            mask=kvalid[:, None] & d_mask,
            other=0.0,
        )
        s = dot(q, tl.trans(k), UPCAST, PRECISION) * scale_log2
        valid = (member & row_mask)[:, None] & (kpos[None, :] <= pos[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            V + rows[:, None] * stride_vr + h * stride_vh + offs_d[None, :],
            mask=kvalid[:, None] & d_mask,
            other=0.0,
        )
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, UPCAST, PRECISION)
        m_i = m_new
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
    out_ptrs = (
        OUT
        + split * stride_os
        + tok[:, None].to(tl.int64) * stride_ot
        + heads[:, None] * stride_oh
        + offs_d[None, :]
    )
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=row_mask[:, None] & d_mask)
    tl.store(LSE + split * stride_ls + tok.to(tl.int64) * stride_lt + heads, lse, mask=row_mask)


class TilePlan:
    """Tiles and block unions of one call (shared by forward and backward)."""

    def __init__(
        self, q_seq, num_seqs: int, block_idx: torch.Tensor, group: int, tile_len: int | None = None
    ):
        self.tile = tile_len or max(1, min(16, 64 // next_pow2(group)))
        self.gp = max(next_pow2(group), _MIN_DOT_ROWS // self.tile)  # padded heads per token
        self.tile_start, self.tile_end = sequence_tiles(q_seq, num_seqs, self.tile)
        if self.tile == 1:  # a one-token tile's union is its own selection
            self.union = block_idx.contiguous()
            self.union_len = (block_idx >= 0).sum(dim=-1).to(torch.int32).contiguous()
        else:
            self.union, self.union_len = tile_block_union(
                block_idx, self.tile_start, self.tile_end, self.tile
            )


def layout_args(layout: KeyLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int, bool, int]:
    dummy = torch.zeros(1, dtype=torch.int32, device=device)
    if layout.is_paged:
        table = layout.block_tables.to(torch.int32).contiguous()
        return dummy, table, table.stride(0), True, layout.page_size
    return layout.cu_seqlens.to(torch.int32).contiguous(), dummy, 0, False, 1


def launch_forward(
    q, k, v, layout, q_seq, q_pos, block_idx, block_size, scale, plan: TilePlan, num_splits: int = 1
):
    """Run `_fwd_kernel`: per split, softmax over its part of the union: (out [splits, Tq, Hq, D], lse2 [splits, Tq, Hq])."""
    num_q, num_heads, head_dim = q.shape
    num_kv = k.shape[1]
    nsel = block_idx.shape[-1]
    out_dtype = q.dtype if num_splits == 1 else torch.float32
    out = torch.empty(num_splits, num_q, num_heads, head_dim, dtype=out_dtype, device=q.device)
    lse = torch.empty(num_splits, num_q, num_heads, dtype=torch.float32, device=q.device)
    if num_q == 0:
        return out, lse
    cu, table, stride_tab, paged, page = layout_args(layout, q.device)
    split_len = -(-plan.union.shape[-1] // num_splits)
    _fwd_kernel[(plan.tile_start.numel(), num_kv, num_splits)](
        q,
        k,
        v,
        out,
        lse,
        q_seq,
        q_pos,
        block_idx,
        plan.union,
        plan.union_len,
        plan.tile_start,
        plan.tile_end,
        cu,
        table,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        lse.stride(0),
        lse.stride(1),
        block_idx.stride(0),
        block_idx.stride(1),
        plan.union.stride(0),
        plan.union.stride(1),
        plan.union_len.stride(0),
        stride_tab,
        nsel,
        scale * LOG2E,
        split_len,
        GROUP=num_heads // num_kv,
        GP=plan.gp,
        TILE=plan.tile,
        KP=next_pow2(nsel),
        HEAD_DIM=head_dim,
        BLOCK_D=next_pow2(head_dim, 16),
        BLOCK_N=block_size,
        PAGED=paged,
        PAGE=page,
        UPCAST=interpreting(),
        PRECISION=dot_precision(q.dtype),
    )
    return out, lse


def merge_splits(out: torch.Tensor, lse2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Combine per-split softmax results out [splits, Tq, Hq, D] by their log2-sum-exp [splits, Tq, Hq]."""
    top = lse2.max(dim=0).values
    weights = torch.exp2(lse2 - torch.where(torch.isneginf(top), 0.0, top))  # an empty split weighs 0
    merged = (weights[..., None] * out.float()).sum(dim=0) / weights.sum(dim=0)[..., None]
    return merged.to(dtype)
