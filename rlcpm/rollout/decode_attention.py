"""Decode attention over a contiguous mirror of the running batch's KV (CPU fast path).

The paged cache scatters a sequence's keys over blocks, so the dense backend gathers every
decoding sequence's whole context, in every layer, at every step, before attention: on CPU
that copy costs as much as the attention itself. Here the engine keeps a second, contiguous
copy of the decoding sequences' KV, laid out the way SDPA reads it,

    mirror [2 (K/V), num_layers, rows, Hkv, capacity, D]     row r = r-th decoding sequence

and a decode step only appends each sequence's new key/value to its row (and to the paged
cache, which stays the source of truth for prefill, prefix sharing and preemption). The mirror
is rebuilt from the paged cache, in one gather for all layers, only when the set or order of
decoding sequences changes (a sequence joins or leaves) or a context outgrows the capacity.
Rows are keyed by (seq_id, kv_epoch): a sequence whose KV was freed and recomputed never
reuses a stale row. Sequences with more than one new token (prefill chunks) in the same step
go through the dense paged path unchanged. Costs one extra copy of the decoding batch's KV.
"""

from __future__ import annotations

import torch

from rlcpm.models.dense_attention import DenseAttention
from rlcpm.models.kv_cache import PagedKVCache
from rlcpm.models.metadata import AttentionMetadata

_CAPACITY_STEP = 128


class MirroredDecodeAttention(DenseAttention):
    """DenseAttention whose first ``num_decode`` sequences (one new token each) read the mirror."""

    def __init__(self, config):
        super().__init__(config)
        self.mirror: torch.Tensor | None = None
        self.row_keys: list[tuple[int, int]] = []
        self.row_lens: list[int] = []
        self.num_decode = 0
        self.num_rebuilds = 0
        self._positions: torch.Tensor | None = None  # [S] cache position of each new token
        self._rows: torch.Tensor | None = None  # [S] = arange(S)
        self._mask: torch.Tensor | None = None  # [S, 1, 1, L] or None when every context is L
        self._max_context = 0
        self._rest_meta: AttentionMetadata | None = None

    def invalidate(self) -> None:
        """Forget every row (the KV it mirrors changed, e.g. new weights)."""
        self.row_keys, self.row_lens = [], []

    def prepare(
        self, kv_cache: PagedKVCache, meta: AttentionMetadata, row_keys: list[tuple[int, int]]
    ) -> None:
        """Plan a step whose first ``len(row_keys)`` sequences decode one token each."""
        num_decode = len(row_keys)
        self.num_decode = num_decode
        if num_decode == 0:
            return
        context_after = meta.context_lens[:num_decode].tolist()
        context_before = [n - 1 for n in context_after]
        max_context = max(context_after)
        if (
            row_keys != self.row_keys
            or context_before != self.row_lens
            or not self._fits(num_decode, max_context)
        ):
            self._rebuild(kv_cache, meta.block_tables[:num_decode], context_before, max_context)
            self.row_keys = list(row_keys)
        self.row_lens = context_after
        device = meta.context_lens.device
        self._positions = torch.tensor(context_before, dtype=torch.long, device=device)
        self._rows = torch.arange(num_decode, device=device)
        self._max_context = max_context
        self._mask = None
        if min(context_after) != max_context:
            keys = torch.arange(max_context, device=device)
            self._mask = (keys[None, :] < meta.context_lens[:num_decode, None]).view(
                num_decode, 1, 1, max_context
            )
        self._rest_meta = None
        if num_decode < meta.num_seqs:
            cu = meta.cu_seqlens_q[num_decode:]
            self._rest_meta = AttentionMetadata(
                cu_seqlens_q=cu - cu[0],
                context_lens=meta.context_lens[num_decode:],
                slot_mapping=meta.slot_mapping[num_decode:],
                block_tables=meta.block_tables[num_decode:],
            )

    def _fits(self, num_rows: int, max_context: int) -> bool:
        return (
            self.mirror is not None
            and self.mirror.shape[2] >= num_rows
            and self.mirror.shape[4] >= max_context
        )

    def _rebuild(
        self, kv_cache: PagedKVCache, block_tables: torch.Tensor, context_before: list[int], max_context: int
    ) -> None:
        block_size = kv_cache.block_size
        num_rows = len(context_before)
        num_blocks = -(-max(context_before) // block_size) if max(context_before) else 0
        capacity = -(-max(max_context, num_blocks * block_size) // _CAPACITY_STEP) * _CAPACITY_STEP
        if not self._fits(num_rows, capacity):
            old_rows = 0 if self.mirror is None else self.mirror.shape[2]
            # zeros, not empty: masked positions still enter softmax(scores) @ V, and 0 * NaN
            # from uninitialised memory would poison the output
            self.mirror = kv_cache.storage.new_zeros(
                2,
                kv_cache.num_layers,
                max(num_rows, old_rows),
                kv_cache.num_kv_heads,
                capacity,
                kv_cache.head_dim,
            )
        if num_blocks:
            table = block_tables[:, :num_blocks].long().clamp(min=0)  # [S, nb]
            gathered = kv_cache.storage[:, :, table]  # [2, L, S, nb, bs, Hkv, D]
            gathered = gathered.flatten(3, 4).transpose(3, 4)  # [2, L, S, Hkv, nb * bs, D]
            self.mirror[:, :, :num_rows, :, : num_blocks * block_size].copy_(gathered)
        self.num_rebuilds += 1

    def forward(self, q, k, v, meta, layer_idx, kv_cache=None):
        num_decode = self.num_decode
        if kv_cache is None or num_decode == 0:
            return super().forward(q, k, v, meta, layer_idx, kv_cache)
        k_slots, v_slots = kv_cache.flat(layer_idx)  # decode slots are never -1: no filtering needed
        slots = meta.slot_mapping[:num_decode]
        k_slots.index_copy_(0, slots, k[:num_decode].to(k_slots.dtype))
        v_slots.index_copy_(0, slots, v[:num_decode].to(v_slots.dtype))
        k_rows, v_rows = self.mirror[0, layer_idx], self.mirror[1, layer_idx]  # [R, Hkv, cap, D]
        k_rows[self._rows, :, self._positions] = k[:num_decode].to(k_rows.dtype)
        v_rows[self._rows, :, self._positions] = v[:num_decode].to(v_rows.dtype)
        keys = k_rows[:num_decode, :, : self._max_context].to(q.dtype)
        values = v_rows[:num_decode, :, : self._max_context].to(q.dtype)
        out = self._sdpa(q[:num_decode, :, None], keys, values, attn_mask=self._mask)[:, :, 0]  # [S, Hq, D]
        if self._rest_meta is None:
            return out
        rest = super().forward(
            q[num_decode:], k[num_decode:], v[num_decode:], self._rest_meta, layer_idx, kv_cache
        )
        return torch.cat([out, rest])


def install_mirrored_decode_attention(model: torch.nn.Module) -> MirroredDecodeAttention | None:
    """Give a dense-attention CPU model the mirrored decode backend (None if not applicable)."""
    if model.config.attention != "dense" or model.device.type != "cpu":
        return None
    backend = MirroredDecodeAttention(model.config)
    model.attention_backend = backend
    for layer in model.model.layers:
        layer.self_attn.backend = backend
    return backend
