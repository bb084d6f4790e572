"""Triton kernels for stage 2 (same signature as block_sparse_attn.block_sparse_attention_reference).

Forward: block_sparse_fwd_triton (query tiles over the union of their selected blocks, online
softmax). Backward, per query tile: recompute the probabilities from the saved lse, accumulate
dq in registers, and add each block's dk/dv with float32 atomics (a key block receives the
gradients of every tile that selected it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlcpm.kernels.infllm_v2.block_sparse_fwd_triton import (
    LOG2E,
    TilePlan,
    block_membership,
    check_block_size,
    key_rows,
    launch_forward,
    layout_args,
    tile_rows,
)
from rlcpm.kernels.infllm_v2.layout import KeyLayout
from rlcpm.kernels.triton_utils import check_inputs, dot, dot_precision, interpreting, next_pow2

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _bwd_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    DK,
    DV,
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
    stride_dot,
    stride_doh,
    stride_lt,
    stride_dqt,
    stride_dqh,
    stride_dkr,
    stride_dkh,
    stride_it,
    stride_ih,
    stride_ut,
    stride_uh,
    stride_ul,
    stride_tab,
    NSEL,
    scale,
    scale_log2,
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
    t0, t1, tok, g, row_mask, pos, seq = tile_rows(TILE_START, TILE_END, Q_SEQ, Q_POS, tile, GROUP, GP, TILE)
    max_pos = tl.max(pos, axis=0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_mask = (offs_d < HEAD_DIM)[None, :]
    heads = h * GROUP + g
    rows_q = tok[:, None].to(tl.int64)
    q = tl.load(
        Q + rows_q * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=row_mask[:, None] & d_mask,
        other=0.0,
    )
    do = tl.load(
        DO + rows_q * stride_dot + heads[:, None] * stride_doh + offs_d[None, :],
        mask=row_mask[:, None] & d_mask,
        other=0.0,
    )
    lse = tl.load(LSE + tok.to(tl.int64) * stride_lt + heads, mask=row_mask, other=0.0)
    delta = tl.load(DELTA + tok.to(tl.int64) * stride_lt + heads, mask=row_mask, other=0.0)
    dq = tl.zeros([TILE * GP, BLOCK_D], tl.float32)
    num_union = tl.load(UNION_LEN + tile * stride_ul + h)
    for u in range(0, num_union):
        b = tl.load(UNION + tile * stride_ut + h * stride_uh + u)
        member = block_membership(IDX, t0, t1, h, b, stride_it, stride_ih, NSEL, GP, TILE, KP)
        kpos = b * BLOCK_N + offs_n
        kvalid = kpos <= max_pos
        kpos_safe = tl.where(kvalid, kpos, 0)
        rows = key_rows(CU, TABLE, seq, kpos_safe, stride_tab, PAGED, PAGE)
        kmask = kvalid[:, None] & d_mask
        k = tl.load(K + rows[:, None] * stride_kr + h * stride_kh + offs_d[None, :], mask=kmask, other=0.0)
        v = tl.load(V + rows[:, None] * stride_vr + h * stride_vh + offs_d[None, :], mask=kmask, other=0.0)
        s = dot(q, tl.trans(k), UPCAST, PRECISION) * scale_log2
        valid = (member & row_mask)[:, None] & (kpos[None, :] <= pos[:, None])
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)  # [M, N]
        dv = dot(tl.trans(p.to(do.dtype)), do, UPCAST, PRECISION)  # [N, D]
        dp = dot(do, tl.trans(v), UPCAST, PRECISION)
        ds = p * (dp - delta[:, None])
        dq += dot(ds.to(k.dtype), k, UPCAST, PRECISION)
        dk = dot(tl.trans(ds.to(q.dtype)), q, UPCAST, PRECISION) * scale
        grad_ptrs = rows[:, None] * stride_dkr + h * stride_dkh + offs_d[None, :]
        tl.atomic_add(DK + grad_ptrs, dk, mask=kmask)
        tl.atomic_add(DV + grad_ptrs, dv, mask=kmask)
    dq_ptrs = DQ + rows_q * stride_dqt + heads[:, None] * stride_dqh + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_mask[:, None] & d_mask)


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, q_seq, q_pos, block_idx, block_size, scale):
        num_seqs = layout.block_tables.shape[0] if layout.is_paged else layout.cu_seqlens.numel() - 1
        plan = TilePlan(q_seq, num_seqs, block_idx, q.shape[1] // k.shape[1])
        out, lse = launch_forward(q, k, v, layout, q_seq, q_pos, block_idx, block_size, scale, plan)
        out, lse = out[0], lse[0]
        ctx.save_for_backward(q, k, v, out, lse, q_seq, q_pos, block_idx)
        ctx.layout, ctx.plan, ctx.block_size, ctx.scale = layout, plan, block_size, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, q_seq, q_pos, block_idx = ctx.saved_tensors
        plan = ctx.plan
        grad_out = grad_out.contiguous()
        delta = (grad_out.float() * out.float()).sum(dim=-1)  # [Tq, Hq]
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        num_q, num_heads, head_dim = q.shape
        num_kv = k.shape[1]
        nsel = block_idx.shape[-1]
        cu, table, stride_tab, paged, page = layout_args(ctx.layout, q.device)
        if num_q:
            _bwd_kernel[(plan.tile_start.numel(), num_kv)](
                q,
                k,
                v,
                grad_out,
                lse,
                delta,
                dq,
                dk,
                dv,
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
                grad_out.stride(0),
                grad_out.stride(1),
                lse.stride(0),
                dq.stride(0),
                dq.stride(1),
                dk.stride(0),
                dk.stride(1),
                block_idx.stride(0),
                block_idx.stride(1),
                plan.union.stride(0),
                plan.union.stride(1),
                plan.union_len.stride(0),
                stride_tab,
                nsel,
                ctx.scale,
                ctx.scale * LOG2E,
                GROUP=num_heads // num_kv,
                GP=plan.gp,
                TILE=plan.tile,
                KP=next_pow2(nsel),
                HEAD_DIM=head_dim,
                BLOCK_D=next_pow2(head_dim, 16),
                BLOCK_N=ctx.block_size,
                PAGED=paged,
                PAGE=page,
                UPCAST=interpreting(),
                PRECISION=dot_precision(q.dtype),
            )
        else:
            dq.zero_()
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def block_sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: KeyLayout,
    q_seq: torch.Tensor,
    q_pos: torch.Tensor,
    block_idx: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """q [Tq, Hq, D], k/v [R, Hkv, D], block_idx [Tq, Hkv, K] -> out [Tq, Hq, D] (differentiable)."""
    check_inputs("block_sparse_attention", _DTYPES, q=q, k=k, v=v)
    check_block_size("block_sparse_attention", block_size)
    q_seq = q_seq.to(torch.int32).contiguous()
    q_pos = q_pos.to(torch.int32).contiguous()
    block_idx = block_idx.to(torch.int32).contiguous()
    return _BlockSparseAttention.apply(
        q.contiguous(), k, v, layout, q_seq, q_pos, block_idx, block_size, scale
    )
