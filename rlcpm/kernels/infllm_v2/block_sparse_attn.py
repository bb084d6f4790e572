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
"""

from __future__ import annotations

import torch

from rlcpm.kernels.infllm_v2.layout import KeyLayout
from rlcpm.kernels.workspace import can_use_scratch, scratch

_CHUNK_ELEMENTS = 1 << 24  # bound on the gathered [chunk, Hkv, K*B, D] keys of the reference


def selected_key_positions(
    block_idx: torch.Tensor, q_pos: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [Tq, Hkv, K*B] int64 (0 where invalid), valid [Tq, Hkv, K*B] bool)."""
    offsets = torch.arange(block_size, device=block_idx.device)
    pos = block_idx.long()[..., None] * block_size + offsets  # [Tq, Hkv, K, B]
    valid = (block_idx[..., None] >= 0) & (pos <= q_pos[:, None, None, None])
    pos = torch.where(valid, pos, 0)
    return pos.flatten(2), valid.flatten(2)


def _gather(
    rows: torch.Tensor, index: torch.Tensor, shape: tuple, compute: torch.dtype, name: str, scratch_ok: bool
) -> torch.Tensor:
    """rows[index] viewed as `shape`, in the compute dtype (into scratch buffers when allowed)."""
    if not scratch_ok:
        return rows.index_select(0, index).view(shape).to(compute)
    gathered = torch.index_select(
        rows, 0, index, out=scratch.get(name, (index.numel(), rows.shape[1]), rows.dtype, rows.device)
    ).view(shape)
    if rows.dtype == compute:
        return gathered
    return scratch.get(f"{name}:{compute}", shape, compute, rows.device).copy_(gathered)


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
    group = num_heads // num_kv
    width = block_idx.shape[-1] * block_size
    chunk = max(1, _CHUNK_ELEMENTS // max(1, num_kv * width * head_dim))
    heads = torch.arange(num_kv, device=q.device)[None, :, None]
    compute = torch.promote_types(q.dtype, torch.float32)
    k_rows, v_rows = k.reshape(-1, head_dim), v.reshape(-1, head_dim)  # row r, head h -> r * Hkv + h
    scratch_ok = can_use_scratch(q, k, v)  # inference: reuse buffers (no page faults per call)
    outs = []
    for start in range(0, num_q, chunk):
        part = slice(start, start + chunk)
        pos, valid = selected_key_positions(block_idx[part], q_pos[part], block_size)
        index = layout.rows(q_seq[part, None, None], pos) * num_kv + heads  # [c, Hkv, N]
        # Gather in token order, heads adjacent ([c, N, Hkv]): both heads' rows stream through
        # memory together (2-3x faster than one head after the other on CPU).
        index = index.transpose(1, 2).flatten()
        shape = (pos.shape[0], pos.shape[2], num_kv, head_dim)
        keys = _gather(k_rows, index, shape, compute, "keys", scratch_ok).transpose(1, 2)  # [c, Hkv, N, D]
        values = _gather(v_rows, index, shape, compute, "values", scratch_ok).transpose(1, 2)
        q4 = q[part].to(compute).view(-1, num_kv, group, head_dim)
        hidden = ~valid[:, :, None]
        if scratch_ok:  # the same ops in place, on reused buffers: bitwise the same result
            score_shape = (*q4.shape[:3], keys.shape[2])
            scores = torch.matmul(q4, keys.transpose(-1, -2), out=scratch.get("scores", score_shape, compute, q.device))
            scores.mul_(scale).masked_fill_(hidden, float("-inf"))
            probs = torch.ops.aten._softmax.out(
                scores, -1, False, out=scratch.get("probs", score_shape, compute, q.device)
            )
        else:
            scores = torch.matmul(q4, keys.transpose(-1, -2)) * scale  # [c, Hkv, G, N]
            probs = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
        out = torch.matmul(probs, values)  # [c, Hkv, G, D]
        outs.append(out.reshape(-1, num_heads, head_dim).to(q.dtype))
    if not outs:
        return q.new_empty(q.shape)
    return torch.cat(outs)
