"""Incremental compressed keys for decoding (SPECS §2.6), stored beside the paged KV cache.

SPECS describes decode-time compression as a buffer of trailing keys: when it holds k keys,
append their mean and drop the first s. The paged KV cache already holds every trailing key,
so the buffer is a view of it: when a step writes key `e` with e >= k - 1 and
(e - k + 1) % s == 0, window j = (e - k + 1) / s is complete and its mean over keys
s*j .. e is computed (with the same `mean_pool_windows` op as batch compression) and stored.

Storage is paged like the KV cache, so prefix sharing and preemption need no bookkeeping:
window j lives in the KV page holding its last key e = s*j + k - 1, at entry
(e % page_size) // s of that page (page_size a multiple of s, or s a multiple of page_size:
then a page holds at most one window end). A shared prefix page already holds the windows
that end in it; a freed page's entries are rewritten before anything reads them, because a
window is read only once its last key has been written.

Layout of one tier: data [num_layers, num_pages * entries_per_page, Hkv, D], in the KV dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlcpm.kernels.infllm_v2.compress import num_windows
from rlcpm.kernels.infllm_v2.config import check_page_fits_stride
from rlcpm.kernels.infllm_v2.layout import KeyLayout
from rlcpm.kernels.workspace import can_use_scratch, scratch


@dataclass
class CompressionPlan:
    """Layer-invariant indices of one engine step for one tier (built once per forward)."""

    new_window_rows: torch.Tensor  # [M, k] KV slots of the windows completed by this step
    new_entries: torch.Tensor  # [M] where their means are stored
    entries: torch.Tensor  # [N] every complete window of the batch's sequences, in order
    cu_entries: torch.Tensor  # [S+1] int32 offsets of each sequence's windows in `entries`


class PagedCompressedKeys:
    """One compression tier (Kc1 or Kc2) for every sequence in a PagedKVCache."""

    def __init__(self, kv_cache, kernel_size: int, kernel_stride: int):
        page = kv_cache.block_size
        check_page_fits_stride(page, kernel_stride)
        self.kernel_size = kernel_size
        self.kernel_stride = kernel_stride
        self.page_size = page
        self.entries_per_page = max(1, page // kernel_stride)
        self.data = torch.zeros(
            kv_cache.num_layers,
            kv_cache.num_blocks * self.entries_per_page,
            kv_cache.num_kv_heads,
            kv_cache.head_dim,
            dtype=kv_cache.dtype,
            device=kv_cache.device,
        )

    def _entry_index(self, layout: KeyLayout, seq: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        end = j * self.kernel_stride + self.kernel_size - 1
        page = layout.block_tables.long()[seq, end // self.page_size]
        local = (end % self.page_size) // self.kernel_stride if self.entries_per_page > 1 else 0
        return page * self.entries_per_page + local

    def plan(
        self, block_tables: torch.Tensor, context_lens: torch.Tensor, new_lens: torch.Tensor
    ) -> CompressionPlan:
        """Indices for a step in which sequence s gains new_lens[s] keys, ending at context_lens[s]."""
        device = block_tables.device
        layout = KeyLayout.paged(block_tables, self.page_size)
        ctx, new = context_lens.long(), new_lens.long()
        k, s = self.kernel_size, self.kernel_stride
        seq_ids = torch.arange(ctx.numel(), device=device)
        # All complete windows of each sequence after this step.
        total = num_windows(ctx, k, s)
        seq = torch.repeat_interleave(seq_ids, total)
        cu = torch.zeros(ctx.numel() + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.cumsum(total, 0)
        j = torch.arange(seq.numel(), device=device) - cu[:-1].long()[seq]
        entries = self._entry_index(layout, seq, j)
        # Windows completed now: those whose last key is among the new keys.
        before = num_windows(ctx - new, k, s)
        fresh = total - before
        seq_new = torch.repeat_interleave(seq_ids, fresh)
        offsets = torch.cumsum(fresh, 0) - fresh
        j_new = before[seq_new] + torch.arange(seq_new.numel(), device=device) - offsets[seq_new]
        positions = (j_new * s)[:, None] + torch.arange(k, device=device)  # [M, k]
        rows = layout.rows(seq_new[:, None], positions)
        return CompressionPlan(rows, self._entry_index(layout, seq_new, j_new), entries, cu)

    def update(self, layer: int, keys_flat: torch.Tensor, plan: CompressionPlan, pool) -> None:
        """Store the means of the windows completed this step (keys_flat: the layer's KV-cache keys)."""
        if plan.new_entries.numel():
            self.data[layer].index_copy_(0, plan.new_entries, pool(keys_flat, plan.new_window_rows))

    def gather(self, layer: int, plan: CompressionPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sequence's compressed keys, packed: ([N, Hkv, D], cu [S+1] int32).

        At inference on CPU the keys land in a reused scratch buffer (valid until this tier's
        next gather): a fresh multi-MB tensor per layer and step costs more in page faults
        than the copy itself."""
        data = self.data[layer]
        if not can_use_scratch(data):
            return data.index_select(0, plan.entries), plan.cu_entries
        name = f"compressed_keys:{self.kernel_size}:{self.kernel_stride}"
        out = scratch.get(name, (plan.entries.numel(), *data.shape[1:]), data.dtype, data.device)
        return torch.index_select(data, 0, plan.entries, out=out), plan.cu_entries
