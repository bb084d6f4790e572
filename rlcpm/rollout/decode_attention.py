"""Decode attention over a contiguous mirror of the decoding sequences' KV (CPU fast path).

The paged cache scatters a sequence's keys over blocks, so the dense backend gathers every
decoding sequence's whole context, in every layer, at every step, before attention: on CPU
that copy costs as much as the attention itself. Here the engine keeps a second, contiguous
copy of the decoding sequences' KV, laid out the way a batched matmul reads it,

    mirror [2 (K/V), num_layers, rows, Hkv, capacity, D]   (float32 for a bfloat16 cache)

and a decode step only appends each sequence's new key/value to its row (and to the paged
cache, which stays the source of truth for prefill, prefix sharing and preemption).

Rows are assigned, never rebuilt wholesale. A row belongs to a (seq_id, kv_epoch) key, so a
sequence whose KV was freed and recomputed never reuses a stale row. A sequence that starts
decoding is copied into a free row from the paged cache (one gather for all layers and all
newcomers); a sequence that stops decoding frees its row, and the last rows move into the
freed ones (a copy of the moved rows only), so the rows in use are always 0..S-1; the rows of
sequences that keep decoding are never copied. The mirror grows when needed (old contents
copied): rows to the batch size, capacity by 1.5x (within the bound below). Queries are
permuted into row order when it differs from the batch order. Sequences with more than one new token (prefill chunks) in the same step go through
the dense paged path unchanged. Costs one extra copy of the decoding batch's KV, each row
padded to the longest context, and never more than twice the paged cache's bytes: a step whose
rows would need more (a long sequence beside many short ones) decodes from the paged cache.

Attention per decoding sequence s and query head h (KV head h // G, G = Hq / Hkv):

    out[s, h] = softmax(q[s, h] K[s]^T / sqrt(D), keys < context_s) V[s]

as two batched matmuls over [S * Hkv] (G query rows each): one pass over each KV head for
all G query heads that share it. Rows padded to the longest context read keys they mask, so
rows of very different lengths (long carried-over trajectories beside new ones in chunked
rollout) are attended in up to four row ranges, each over its own longest context
(`split_rows`); a batch of rows is loaded longest first, so similar lengths sit together. The mirror of a bfloat16 cache is float32 (the bfloat16 keys
and values upcast exactly, queries upcast, output cast back): on CPU these small-row matmuls
and the softmax are faster in float32 than in bfloat16 (1.1-2x, development VM), and the
scores keep float32 precision, as in SDPA.
"""

from __future__ import annotations

from itertools import accumulate

import torch

from rlcpm.models.dense_attention import DenseAttention
from rlcpm.models.kv_cache import PagedKVCache
from rlcpm.models.metadata import AttentionMetadata

_CAPACITY_STEP = 128
_GROWTH = 1.5

RowKey = tuple[int, int]  # (seq_id, kv_epoch)


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def split_rows(row_lens: list[int], max_ranges: int = 4, min_saving: float = 0.1) -> list[tuple[int, int]]:
    """Row ranges attended separately, each over its own longest context: the range whose best
    split reads the most fewer padded keys is split in two, while that saves at least
    ``min_saving`` of the keys one call over every row reads, up to ``max_ranges`` ranges.

    Rows are loaded longest first, so a batch that mixes long carried-over sequences with new
    ones (chunked rollout) splits into a few ranges of similar lengths."""
    ranges = [(0, len(row_lens))]
    best = [_best_split(row_lens)]  # (keys saved, split point) of each range, computed once
    threshold = min_saving * len(row_lens) * max(row_lens)
    while len(ranges) < max_ranges:
        index = max(range(len(ranges)), key=best.__getitem__)
        saving, split = best[index]
        if saving < threshold:
            break
        start, end = ranges[index]
        ranges[index : index + 1] = [(start, start + split), (start + split, end)]
        best[index : index + 1] = [
            _best_split(row_lens[start : start + split]),
            _best_split(row_lens[start + split : end]),
        ]
    return ranges


def _best_split(lens: list[int]) -> tuple[int, int]:
    """(keys saved, split point) of the best split of one range in two ((0, 0) if none)."""
    count = len(lens)
    prefix_max = list(accumulate(lens, max))
    suffix_max = list(accumulate(reversed(lens), max))[::-1]
    padded = count * prefix_max[-1]
    splits = ((padded - a * prefix_max[a - 1] - (count - a) * suffix_max[a], a) for a in range(1, count))
    return max(splits, default=(0, 0))


class MirroredDecodeAttention(DenseAttention):
    """DenseAttention whose first ``num_decode`` sequences (one new token each) read the mirror."""

    def __init__(self, config):
        super().__init__(config)
        self.mirror: torch.Tensor | None = None
        self.row_of: dict[RowKey, int] = {}
        self.row_lens: list[int] = []  # tokens held by each row in use (index = row)
        self.num_decode = 0
        self.num_row_loads = 0  # sequences copied in from the paged cache
        self.num_row_moves = 0  # rows moved down into freed rows
        self.num_grows = 0  # reallocations (more rows or capacity)
        self.num_split_steps = 0  # steps whose rows were attended in more than one range
        self._row_index: torch.Tensor | None = None  # [S] mirror row of each decoding sequence
        self._is_identity = True  # row i holds decoding sequence i
        self._positions: torch.Tensor | None = None  # [S] cache position of each new token
        # (first row, end row, keys, [rows, 1, 1, keys] keys a row must not see or None): rows
        # attended together, each range over its own longest context (split_rows)
        self._ranges: list[tuple[int, int, int, torch.Tensor | None]] = []
        self._rest_meta: AttentionMetadata | None = None

    def invalidate(self) -> None:
        """Forget every row (the KV it mirrors changed, e.g. new weights) and zero the mirror.

        Keys past a row's context are masked, but their probability 0 times a NaN left by
        diverged weights is NaN: the mirror holds only finite values from here on."""
        self.row_of, self.row_lens = {}, []
        if self.mirror is not None:
            with torch.inference_mode():  # the mirror was made in inference mode
                self.mirror.zero_()

    # ------------------------------------------------------------------------------ planning

    def prepare(self, kv_cache: PagedKVCache, meta: AttentionMetadata, row_keys: list[RowKey]) -> None:
        """Plan a step whose first ``len(row_keys)`` sequences decode one token each."""
        num_decode = len(row_keys)
        self.num_decode = num_decode
        if num_decode == 0:  # rows stay valid: a row is reused only if its key and length match
            return
        context_after = meta.context_lens[:num_decode].tolist()
        context_before = [n - 1 for n in context_after]
        max_context = max(context_after)
        if not self._ensure_size(kv_cache, num_decode, max_context):
            self.num_decode = 0  # too many slots to mirror: this step decodes from the paged cache
            return
        rows, loads, moves = self._assign_rows(row_keys, context_before)
        if moves:
            self._move_rows(moves)
        if loads:
            self._load_rows(kv_cache, meta.block_tables, loads, rows, context_before)
        self.row_of = dict(zip(row_keys, rows))
        self.row_lens = [0] * num_decode
        for row, n in zip(rows, context_after):
            self.row_lens[row] = n

        device = meta.context_lens.device
        self._is_identity = rows == list(range(num_decode))
        self._row_index = torch.tensor(rows, dtype=torch.long, device=device)
        self._positions = torch.tensor(context_before, dtype=torch.long, device=device)
        self._ranges = []
        row_context = torch.tensor(self.row_lens, device=device)
        for start, end in split_rows(self.row_lens):
            length = max(self.row_lens[start:end])
            hidden = None
            if min(self.row_lens[start:end]) != length:
                keys = torch.arange(length, device=device)
                hidden = (keys[None, :] >= row_context[start:end, None]).view(end - start, 1, 1, length)
            self._ranges.append((start, end, length, hidden))
        self.num_split_steps += len(self._ranges) > 1
        self._rest_meta = None
        if num_decode < meta.num_seqs:
            cu = meta.cu_seqlens_q[num_decode:]
            self._rest_meta = AttentionMetadata(
                cu_seqlens_q=cu - cu[0],
                context_lens=meta.context_lens[num_decode:],
                slot_mapping=meta.slot_mapping[num_decode:],
                block_tables=meta.block_tables[num_decode:],
            )

    def _assign_rows(
        self, row_keys: list[RowKey], context_before: list[int]
    ) -> tuple[list[int], list[int], list[tuple[int, int]]]:
        """Rows 0..S-1 for the S decoding sequences: (row of each, sequences to load from the
        paged cache, (from, to) row moves). Sequences that keep decoding keep their row unless
        it is >= S, in which case it moves down into a freed row."""
        num_decode = len(row_keys)
        rows = [-1] * num_decode
        loads = []
        for index, (key, length) in enumerate(zip(row_keys, context_before)):
            row = self.row_of.get(key)
            if row is not None and self.row_lens[row] == length:
                rows[index] = row
            else:
                loads.append(index)
        taken = {row for row in rows if 0 <= row < num_decode}
        free = iter(row for row in range(num_decode) if row not in taken)
        moves = []
        for index, row in enumerate(rows):
            if row >= num_decode:
                rows[index] = next(free)
                moves.append((row, rows[index]))
        for index in sorted(loads, key=lambda i: -context_before[i]):  # longest first: rows stay
            rows[index] = next(free)  # sorted by length when a batch starts decoding (split_rows)
        return rows, loads, moves

    def _ensure_size(self, kv_cache: PagedKVCache, num_rows: int, max_context: int) -> bool:
        """Room for num_rows rows of max_context keys, in at most twice the paged cache's bytes
        (rows are padded to the longest context: a long sequence beside many short ones would
        take many times the KV budget). False, the mirror unchanged, when they do not fit."""
        mirror_dtype = torch.promote_types(kv_cache.dtype, torch.float32)
        limit = 2 * kv_cache.num_slots * kv_cache.dtype.itemsize // mirror_dtype.itemsize  # slots
        if num_rows * max_context > limit:
            return False
        mirror = self.mirror
        if mirror is not None and mirror.shape[2] >= num_rows and mirror.shape[4] >= max_context:
            return True
        old_rows, old_capacity = (0, 0) if mirror is None else (mirror.shape[2], mirror.shape[4])
        if old_rows * max_context > limit:  # the old rows, this long, would not fit: start afresh
            self.mirror = mirror = None  # (every row loads again)
            old_rows, self.row_of, self.row_lens = 0, {}, []
        rows = max(num_rows, old_rows)
        capacity = old_capacity
        if max_context > old_capacity:
            capacity = _round_up(max(max_context, int(old_capacity * _GROWTH)), _CAPACITY_STEP)
        capacity = max(min(capacity, limit // rows), max_context)
        # zeros, not empty: keys past a row's context are masked, but softmax(scores) @ V still
        # multiplies them by 0, and 0 * NaN from uninitialised memory would poison the output
        new = kv_cache.storage.new_zeros(
            2, kv_cache.num_layers, rows, kv_cache.num_kv_heads, capacity, kv_cache.head_dim,
            dtype=mirror_dtype,
        )  # fmt: skip
        if mirror is not None and self.row_lens:  # rows longer than capacity are not decoding now
            used, length = len(self.row_lens), min(max(self.row_lens), capacity)
            new[:, :, :used, :, :length].copy_(mirror[:, :, :used, :, :length])
        self.mirror = new
        self.num_grows += 1
        return True

    def _move_rows(self, moves: list[tuple[int, int]]) -> None:
        sources, targets = zip(*moves)
        length = max(self.row_lens[row] for row in sources)
        src = torch.tensor(sources, dtype=torch.long, device=self.mirror.device)
        dst = torch.tensor(targets, dtype=torch.long, device=self.mirror.device)
        # every target is a freed row < S and every source a row >= S: no overlap
        self.mirror[:, :, dst, :, :length] = self.mirror[:, :, src, :, :length]
        self.num_row_moves += len(moves)

    def _load_rows(
        self,
        kv_cache: PagedKVCache,
        block_tables: torch.Tensor,
        loads: list[int],
        rows: list[int],
        context_before: list[int],
    ) -> None:
        """Copy the cached KV of the sequences ``loads`` (batch indices) into their rows.

        One gather per number of KV blocks: a batch of short new sequences next to a few long
        carried ones (chunked rollout) copies each sequence's own blocks, not the longest's."""
        self.num_row_loads += len(loads)
        block_size = kv_cache.block_size
        by_num_blocks: dict[int, list[int]] = {}
        for index in loads:
            if context_before[index] > 0:
                by_num_blocks.setdefault(-(-context_before[index] // block_size), []).append(index)
        device = block_tables.device
        for num_blocks, indices in by_num_blocks.items():
            longest = max(context_before[index] for index in indices)
            batch_index = torch.tensor(indices, dtype=torch.long, device=device)
            table = block_tables[batch_index, :num_blocks].long().clamp(min=0)  # [n, nb]
            gathered = kv_cache.storage[:, :, table]  # [2, L, n, nb, bs, Hkv, D]
            gathered = gathered.flatten(3, 4)[:, :, :, :longest].transpose(3, 4)  # [2, L, n, Hkv, longest, D]
            lengths = torch.tensor([context_before[index] for index in indices], device=device)
            stale = torch.arange(longest, device=device)[None, :] >= lengths[:, None]  # [n, longest]
            gathered.masked_fill_(stale[None, None, :, None, :, None], 0.0)  # a block's unwritten tail
            target = torch.tensor(
                [rows[index] for index in indices], dtype=torch.long, device=self.mirror.device
            )
            self.mirror[:, :, target, :, :longest] = gathered.to(self.mirror.dtype)

    # ------------------------------------------------------------------------------- forward

    def forward(self, q, k, v, meta, layer_idx, kv_cache=None):
        num_decode = self.num_decode
        if kv_cache is None or num_decode == 0:
            return super().forward(q, k, v, meta, layer_idx, kv_cache)
        k_slots, v_slots = kv_cache.flat(layer_idx)  # decode slots are never -1: no filtering needed
        slots = meta.slot_mapping[:num_decode]
        k_new, v_new = k[:num_decode], v[:num_decode]
        k_slots.index_copy_(0, slots, k_new.to(k_slots.dtype))
        v_slots.index_copy_(0, slots, v_new.to(v_slots.dtype))
        k_rows, v_rows = self.mirror[0, layer_idx], self.mirror[1, layer_idx]  # [R, Hkv, cap, D]
        k_rows[self._row_index, :, self._positions] = k_new.to(k_rows.dtype)
        v_rows[self._row_index, :, self._positions] = v_new.to(v_rows.dtype)
        q_new = q[:num_decode].to(k_rows.dtype)
        q_rows = q_new  # rows are in mirror order: queries in, outputs back out
        if not self._is_identity:
            q_rows = torch.empty_like(q_new).index_copy_(0, self._row_index, q_new)
        outs = [
            self._attend_rows(
                q_rows[start:end], k_rows[start:end, :, :length], v_rows[start:end, :, :length], hidden
            )
            for start, end, length, hidden in self._ranges
        ]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        if not self._is_identity:
            out = out.index_select(0, self._row_index)
        out = out.to(q.dtype)
        if self._rest_meta is None:
            return out
        rest = super().forward(
            q[num_decode:], k[num_decode:], v[num_decode:], self._rest_meta, layer_idx, kv_cache
        )
        return torch.cat([out, rest])

    def _attend_rows(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, hidden: torch.Tensor | None
    ) -> torch.Tensor:
        """q [S, Hq, D], keys/values [S, Hkv, L, D] (row s = sequence s), hidden [S, 1, 1, L]
        True at the keys past a row's context (None: none) -> [S, Hq, D]."""
        num_seqs, num_heads, head_dim = q.shape
        num_kv_heads, context = keys.shape[1], keys.shape[2]
        group = num_heads // num_kv_heads
        q_rows = (q * self.scale).reshape(num_seqs * num_kv_heads, group, head_dim)
        scores = torch.bmm(q_rows, keys.reshape(num_seqs * num_kv_heads, context, head_dim).transpose(1, 2))
        if hidden is not None:
            scores.view(num_seqs, num_kv_heads, group, context).masked_fill_(hidden, float("-inf"))
        probs = scores.softmax(dim=-1)  # [S Hkv, G, L]
        out = torch.bmm(probs, values.reshape(num_seqs * num_kv_heads, context, head_dim))
        return out.view(num_seqs, num_heads, head_dim)


def install_mirrored_decode_attention(model: torch.nn.Module) -> MirroredDecodeAttention | None:
    """Give a dense-attention CPU model the mirrored decode backend (None if not applicable)."""
    if model.config.attention != "dense" or model.device.type != "cpu":
        return None
    backend = MirroredDecodeAttention(model.config)
    model.attention_backend = backend
    for layer in model.model.layers:
        layer.self_attn.backend = backend
    return backend
