"""Stage 2 of InfLLM v2 (SPECS §2.5): attention over the selected key blocks only.

Query token t (sequence q_seq[t], position q_pos[t]) and the query heads of KV head h attend
the keys of the blocks block_idx[t, h, :] (block b holds positions b*B .. b*B + B - 1; -1 =
no block), with the usual causal mask inside the query's own block:

    out[t, g] = softmax_{key n in selected blocks, pos(n) <= q_pos[t]} (q[t, g] . k[n] * scale) v[n]

Keys and values are [R, Hkv, D], addressed through a KeyLayout (packed training keys or the
engine's paged cache). Every query's own block is always selected (it is forced in stage 1),
so every row has at least one key.

The reference gathers only the selected blocks (Tq x Hkv x K*B keys, in query chunks) and is
differentiable through autograd; the Triton kernel (block_sparse_attn_triton) is a
flash-attention style forward with its own backward.

The reference's softmax runs in two passes over pieces of the selected keys (1024 per KV head,
about 1 MB for 2 KV heads, so a piece is still in the CPU's cache when the matmul reads it): scores of every
piece, one max and one sum over all of them, then the value matmuls accumulated piece by
piece. The same arithmetic runs in place on reused buffers at inference (bitwise equal).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlcpm.kernels.infllm_v2.layout import KeyLayout
from rlcpm.kernels.workspace import can_use_scratch, scratch

_CHUNK_ELEMENTS = 1 << 24  # bound on the gathered [chunk, Hkv, K*B, D] keys of the reference
_PIECE_KEYS = 1024  # keys per KV head gathered per pass of the two-pass softmax (512 KB of float32)


def selected_key_positions(
    block_idx: torch.Tensor, q_pos: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [Tq, Hkv, K*B] int64 (0 where invalid), valid [Tq, Hkv, K*B] bool)."""
    offsets = torch.arange(block_size, device=block_idx.device)
    pos = block_idx.long()[..., None] * block_size + offsets  # [Tq, Hkv, K, B]
    valid = (block_idx[..., None] >= 0) & (pos <= q_pos[:, None, None, None])
    pos = torch.where(valid, pos, 0)
    return pos.flatten(2), valid.flatten(2)


def block_sparse_attention_reference(
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
    """q [Tq, Hq, D], k/v [R, Hkv, D], block_idx [Tq, Hkv, K] int -> out [Tq, Hq, D] (q.dtype).

    Computed in float32 (float64 inputs stay float64); only the selected blocks are gathered.
    """
    num_q, num_heads, head_dim = q.shape
    num_kv = k.shape[1]
    width = block_idx.shape[-1] * block_size
    chunk = max(1, _CHUNK_ELEMENTS // max(1, num_kv * width * head_dim))
    heads = torch.arange(num_kv, device=q.device)[None, :, None]
    compute = torch.promote_types(q.dtype, torch.float32)
    k_rows, v_rows = k.reshape(-1, head_dim), v.reshape(-1, head_dim)  # row r, head h -> r * Hkv + h
    attend = _attend_on_scratch if can_use_scratch(q, k, v) else _attend
    outs = []
    for start in range(0, num_q, chunk):
        part = slice(start, start + chunk)
        pos, valid = selected_key_positions(block_idx[part], q_pos[part], block_size)
        index = layout.rows(q_seq[part, None, None], pos) * num_kv + heads  # [c, Hkv, N]
        q3 = q[part].to(compute).reshape(-1, num_heads // num_kv, head_dim) * scale  # [c*Hkv, G, D]
        out = attend(q3, k_rows, v_rows, *_pieces(index, valid))  # [c*Hkv, G, D]
        outs.append(out.view(-1, num_heads, head_dim).to(q.dtype))
    if not outs:
        return q.new_empty(q.shape)
    return torch.cat(outs)


def _pieces(index: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the keys of [c, Hkv, N] into P pieces of at most _PIECE_KEYS:
    (index [P, c*Hkv*n] rows, mask [P, c*Hkv, 1, n] float: 0 for a key to attend, -inf else).

    Padding keys point at row 0 and are masked."""
    rows, width = index.shape[0] * index.shape[1], index.shape[2]
    piece = min(width, _PIECE_KEYS)
    num_pieces = -(-width // piece)
    pad = num_pieces * piece - width
    if pad:
        index, valid = F.pad(index, (0, pad)), F.pad(valid, (0, pad), value=False)
    index = index.reshape(rows, num_pieces, piece).transpose(0, 1).reshape(num_pieces, -1)
    mask = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device).masked_fill_(
        ~valid, float("-inf")
    )
    return index, mask.reshape(rows, num_pieces, 1, piece).transpose(0, 1)


def _attend(q3, k_rows, v_rows, index, mask):
    """Two-pass softmax attention of the pre-scaled q3 [M, G, D] over keys gathered piece by
    piece (index [P, M*n] rows of k_rows/v_rows, additive mask [P, M, 1, n]): out [M, G, D]."""
    num_pieces, rows, _, piece = mask.shape
    compute = q3.dtype
    mask = mask.to(compute)
    scores = torch.stack(
        [torch.baddbmm(mask[p], q3, _gather(k_rows, index[p], compute).view(rows, piece, -1).transpose(1, 2))
         for p in range(num_pieces)]
    )  # fmt: skip  # [P, M, G, n]
    probs = torch.exp(scores - scores.detach().amax(dim=(0, 3), keepdim=True))
    denominator = probs.sum(dim=(0, 3))  # [M, G]
    out = None
    for p in range(num_pieces):
        values = _gather(v_rows, index[p], compute).view(rows, piece, -1)
        out = torch.bmm(probs[p], values) if out is None else torch.baddbmm(out, probs[p], values)
    return out / denominator[..., None]


def _attend_on_scratch(q3, k_rows, v_rows, index, mask):
    """`_attend` in place on reused buffers (inference only): the same arithmetic, bitwise."""
    num_pieces, rows, _, piece = mask.shape
    compute = q3.dtype
    scores = scratch.get("scores", (num_pieces, rows, q3.shape[1], piece), compute, q3.device)
    keys = _Gatherer("keys", k_rows, index.shape[1], compute)
    for index_p, mask_p, scores_p in zip(index.unbind(0), mask.to(compute).unbind(0), scores.unbind(0)):
        torch.baddbmm(mask_p, q3, keys(index_p).view(rows, piece, -1).transpose(1, 2), out=scores_p)
    probs = scores.sub_(scores.amax(dim=(0, 3), keepdim=True)).exp_()
    denominator = probs.sum(dim=(0, 3))
    values = _Gatherer("values", v_rows, index.shape[1], compute)
    out = None
    for index_p, probs_p in zip(index.unbind(0), probs.unbind(0)):
        values_p = values(index_p).view(rows, piece, -1)
        out = torch.bmm(probs_p, values_p) if out is None else out.baddbmm_(probs_p, values_p)
    return out.div_(denominator[..., None])


class _Gatherer:
    """rows[index] in the compute dtype, into one reused scratch buffer per name."""

    def __init__(self, name: str, rows: torch.Tensor, count: int, compute: torch.dtype):
        self.rows = rows
        self.buffer = scratch.get(name, (count, rows.shape[1]), rows.dtype, rows.device)
        self.converted = None
        if rows.dtype != compute:
            self.converted = scratch.get(f"{name}:{compute}", (count, rows.shape[1]), compute, rows.device)

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        gathered = torch.index_select(self.rows, 0, index, out=self.buffer)
        return gathered if self.converted is None else self.converted.copy_(gathered)


def _gather(rows: torch.Tensor, index: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    return rows.index_select(0, index).to(compute)
