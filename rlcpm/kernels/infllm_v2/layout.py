"""Where the keys of each sequence live, and which queries belong to which sequence.

Every InfLLM v2 op works on *query tokens* described by two int64 vectors

    q_seq [Tq]   the sequence each query belongs to (non-decreasing)
    q_pos [Tq]   its absolute position in that sequence: it sees keys 0 .. q_pos

and on keys/values [R, Hkv, D] addressed through a `KeyLayout`:

    packed (training):  row(s, pos) = cu_seqlens[s] + pos
    paged  (engine):    row(s, pos) = block_tables[s, pos // page_size] * page_size + pos % page_size

so one implementation serves the learner's packed forward, the engine's chunked prefill and
decode, and any subset of query tokens (the dense_len switch splits a batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KeyLayout:
    """Packed (`cu_seqlens`) or paged (`block_tables` + `page_size`) key rows; see the module docstring."""

    cu_seqlens: torch.Tensor | None = None  # [S+1] int
    block_tables: torch.Tensor | None = None  # [S, max_pages] int
    page_size: int = 0

    @classmethod
    def packed(cls, cu_seqlens: torch.Tensor) -> KeyLayout:
        return cls(cu_seqlens=cu_seqlens)

    @classmethod
    def paged(cls, block_tables: torch.Tensor, page_size: int) -> KeyLayout:
        return cls(block_tables=block_tables, page_size=page_size)

    @property
    def is_paged(self) -> bool:
        return self.block_tables is not None

    def rows(self, seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Row of key `pos` of sequence `seq` (broadcasting int64 tensors; pos must be >= 0)."""
        if self.is_paged:  # index_select on the flat table: several times faster than table[seq, page]
            entry = seq * self.block_tables.shape[1] + pos // self.page_size
            page = self.block_tables.reshape(-1).index_select(0, entry.reshape(-1)).view(entry.shape)
            return page.long() * self.page_size + pos % self.page_size
        return self.cu_seqlens.long()[seq] + pos


def sequence_starts(q_seq: torch.Tensor, num_seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts [S], index of each query among its sequence's queries [Tq]) for sorted q_seq."""
    counts = torch.bincount(q_seq, minlength=num_seqs)
    starts = torch.cumsum(counts, 0) - counts
    return counts, torch.arange(q_seq.numel(), device=q_seq.device) - starts[q_seq]
