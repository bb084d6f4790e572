"""Query tiles for the Triton kernels: runs of consecutive query tokens of ONE sequence.

A tile of up to `tile_len` tokens shares the compressed keys (stage 1) or the union of its
tokens' selected blocks (stage 2), so neighbouring tokens load each key once per tile.
"""

from __future__ import annotations

import torch


def sequence_tiles(q_seq: torch.Tensor, num_seqs: int, tile_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile_start [n_tiles], tile_end [n_tiles]) int32: query rows [start, end) of one sequence each."""
    device = q_seq.device
    counts = torch.bincount(q_seq, minlength=num_seqs)
    starts = torch.cumsum(counts, 0) - counts
    tiles_per_seq = (counts + tile_len - 1) // tile_len
    tile_seq = torch.repeat_interleave(torch.arange(num_seqs, device=device), tiles_per_seq)
    first_tile = torch.cumsum(tiles_per_seq, 0) - tiles_per_seq
    local = torch.arange(tile_seq.numel(), device=device) - first_tile[tile_seq]
    tile_start = starts[tile_seq] + local * tile_len
    tile_end = torch.minimum(tile_start + tile_len, (starts + counts)[tile_seq])
    return tile_start.to(torch.int32), tile_end.to(torch.int32)


def tile_block_union(
    block_idx: torch.Tensor, tile_start: torch.Tensor, tile_end: torch.Tensor, tile_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Union of the selected blocks of each tile's tokens, per KV head.

    block_idx [Tq, Hkv, K] (ascending, -1 padded) -> (union [n_tiles, Hkv, U] int32 ascending,
    padded with -1; union_len [n_tiles, Hkv] int32).
    """
    num_tiles = tile_start.numel()
    num_q, num_kv, k = block_idx.shape
    rows = tile_start.long()[:, None] + torch.arange(tile_len, device=block_idx.device)  # [n_tiles, L]
    in_tile = rows < tile_end.long()[:, None]
    gathered = block_idx[rows.clamp(max=max(num_q - 1, 0))]  # [n_tiles, L, Hkv, K]
    gathered = torch.where(in_tile[:, :, None, None], gathered, -1)
    flat = gathered.permute(0, 2, 1, 3).reshape(num_tiles, num_kv, tile_len * k)
    big = torch.iinfo(torch.int32).max
    flat = torch.where(flat < 0, big, flat).sort(dim=-1).values
    duplicate = torch.zeros_like(flat, dtype=torch.bool)
    duplicate[..., 1:] = flat[..., 1:] == flat[..., :-1]
    flat = torch.where(duplicate, big, flat).sort(dim=-1).values
    union_len = (flat != big).sum(dim=-1)
    width = max(int(union_len.max()) if union_len.numel() else 0, 1)
    union = flat[..., :width]
    return torch.where(union == big, -1, union).to(torch.int32), union_len.to(torch.int32)
