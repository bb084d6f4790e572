"""Dense attention backends: `dense` (torch SDPA) and `reference` (a readable masked softmax).

Both implement the same contract (rlcpm.models.attention.AttentionBackend):

- packed training, no cache: query i of a sequence sees keys 0..i of the same sequence;
- paged cache: new K/V are written at `meta.slot_mapping` first; new query i of sequence s
  (0-based among its n_s new tokens) then sees cached keys j < context_lens[s] - n_s + i + 1.

- packed with shared prefixes (`meta.prefix_seq`): a sequence continuing prefix p sees every
  key of p, then its own keys causally (one prompt, stored once, for all its responses).

`dense` groups the sequences by length (`length_buckets`: similar lengths together, at most
1.25x padded work per group) and runs one `scaled_dot_product_attention` call per group over
the group padded to its longest (padded query rows are computed and dropped). No Python loop
over tokens. `reference` loops over sequences and spells the mask out; it is the oracle in
tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlcpm.models.attention import AttentionBackend, register_attention_backend
from rlcpm.models.kv_cache import PagedKVCache
from rlcpm.models.metadata import AttentionMetadata


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale, masked to `visible`) v for one sequence, computed in float32.

    q [Tq, Hq, D], k/v [Tk, Hkv, D] (Hq a multiple of Hkv: query head h uses KV head
    h // (Hq / Hkv)), visible [Tq, Tk] bool -> [Tq, Hq, D].
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).float()
    v = v.repeat_interleave(group, dim=1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale  # [Hq, Tq, Tk]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)


def gather_cached_kv(
    kv_cache: PagedKVCache, layer_idx: int, meta: AttentionMetadata
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's cached keys/values in order: [S, max_context_len, Hkv, D] each."""
    max_ctx = meta.max_context_len
    block_size = kv_cache.block_size

    def build_table() -> torch.Tensor:
        num_blocks = -(-max_ctx // block_size)
        return meta.block_tables[:, :num_blocks].clamp(min=0).long()  # -1 padding is masked anyway

    table = meta.cached("kv_gather_table", build_table)  # [S, nb]
    num_seqs = table.shape[0]
    k = kv_cache.k[layer_idx][table].view(num_seqs, -1, kv_cache.num_kv_heads, kv_cache.head_dim)
    v = kv_cache.v[layer_idx][table].view(num_seqs, -1, kv_cache.num_kv_heads, kv_cache.head_dim)
    return k[:, :max_ctx], v[:, :max_ctx]


def paged_visibility(meta: AttentionMetadata) -> torch.Tensor:
    """[S, max_q, max_ctx] bool: padded new query i of sequence s sees cached key j iff
    j < context_lens[s] - n_s + min(i, n_s - 1) + 1 (padding rows copy the last real row)."""

    def build() -> torch.Tensor:
        device = meta.cu_seqlens_q.device
        n = meta.seq_lens_q  # [S]
        i = torch.arange(meta.max_seqlen_q, device=device)
        last_visible = meta.context_lens.long()[:, None] - n[:, None] + torch.minimum(i[None], n[:, None] - 1)
        j = torch.arange(meta.max_context_len, device=device)
        return j[None, None, :] <= last_visible[:, :, None]

    return meta.cached("paged_visibility", build)


@dataclass
class _Bucket:
    """Sequences attended in one padded SDPA call (layer-invariant; built once per forward)."""

    rows: torch.Tensor | slice  # packed rows of its sequences' new tokens, in order
    padded_index: torch.Tensor | None  # [Tb] row of each token in [C * width]; None: no padding
    num_seqs: int  # C
    width: int  # the most new tokens of one of its sequences
    fresh: bool  # every sequence attends to its own new tokens only: causal, nothing cached read
    block_table: torch.Tensor | None = None  # [C, nb] cache blocks (sequences with cached context)
    visible: torch.Tensor | None = None  # [C, 1, width, Lk] paged visibility (idem)


@dataclass
class _BucketPlan:
    buckets: list[_Bucket]
    inverse: torch.Tensor | None  # [T] row of each token in cat(bucket outputs); None: same order


def length_buckets(new_lens: list[int], key_lens: list[int], max_padding: float = 1.25) -> list[list[int]]:
    """Sequence indices grouped for padded attention calls, each group padded to its own longest.

    Sorted by key count (then new tokens), longest first; a group takes the next sequence while
    its padded work (sequences x widest x most keys) stays within ``max_padding`` times its real
    work (sum of new tokens x keys). Similar lengths share one call; a ragged batch (a few long
    carried-over prefixes beside many short prompts) costs a few calls, not one per sequence
    and not all padded to the longest."""
    order = sorted(range(len(new_lens)), key=lambda s: (key_lens[s], new_lens[s]), reverse=True)
    groups: list[list[int]] = []
    width = most_keys = real = 0
    for s in order:
        n, keys = new_lens[s], key_lens[s]
        if groups:
            grown_width = max(width, n)
            padded = (len(groups[-1]) + 1) * grown_width * most_keys
            if padded <= max_padding * (real + n * keys):
                groups[-1].append(s)
                width, real = grown_width, real + n * keys
                continue
        groups.append([s])
        width, most_keys, real = n, keys, n * keys
    return groups


def _token_rows(cu: list[int], seqs: list[int], device) -> torch.Tensor:
    """Packed rows of the tokens of sequences ``seqs`` (cu: the cu_seqlens as a list), in order."""
    if not seqs:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(cu[s], cu[s + 1], device=device) for s in seqs])


def _padded_index(lens: list[int], device) -> torch.Tensor | None:
    """[sum lens] row of each token in the [len(lens) * max(lens)] padded layout; None: no padding."""
    width = max(lens)
    if min(lens) == width:
        return None
    return torch.cat([torch.arange(n, device=device) + i * width for i, n in enumerate(lens)])


def _pad_rows(x: torch.Tensor, padded_index: torch.Tensor | None, count: int, width: int) -> torch.Tensor:
    """[Tb, H, D] tokens of ``count`` sequences -> [count, width, H, D] (zeros after each end)."""
    if padded_index is not None:
        x = x.new_zeros(count * width, *x.shape[1:]).index_copy(0, padded_index, x)
    return x.view(count, width, *x.shape[1:])


def _bucket_plan(meta: AttentionMetadata, kv_cache: PagedKVCache | None, dtype: torch.dtype) -> _BucketPlan:
    """Split a forward's sequences into length buckets (see `length_buckets`). Without a cache
    every sequence is fresh; with one, a sequence whose every cached key is new this step is
    fresh when the cache stores k/v exactly (its dtype is ``dtype``): nothing is gathered back."""
    reuse_new_kv = kv_cache is None or kv_cache.dtype == dtype

    def build() -> _BucketPlan:
        device = meta.cu_seqlens_q.device
        n = meta.seq_lens_q.tolist()
        cu = meta.cu_seqlens_q.tolist()
        keys = meta.context_lens.tolist() if meta.has_cache else n
        fresh = [keys[s] == n[s] and reuse_new_kv for s in range(len(n))]
        groups = []
        for kind in (True, False):
            members = [s for s in range(len(n)) if fresh[s] == kind]
            groups += [(kind, [members[i] for i in group]) for group in
                       length_buckets([n[s] for s in members], [keys[s] for s in members])]  # fmt: skip
        buckets = []
        for is_fresh, seqs in groups:
            lens = [n[s] for s in seqs]
            contiguous = seqs == list(range(seqs[0], seqs[0] + len(seqs)))
            rows = slice(cu[seqs[0]], cu[seqs[-1] + 1]) if contiguous else _token_rows(cu, seqs, device)
            width = max(lens)
            bucket = _Bucket(rows, _padded_index(lens, device), len(seqs), width, is_fresh)
            if not is_fresh:
                index = torch.tensor(seqs, dtype=torch.long, device=device)
                most_keys = max(keys[s] for s in seqs)
                num_blocks = -(-most_keys // kv_cache.block_size)
                bucket.block_table = meta.block_tables[index, :num_blocks].clamp(min=0).long()
                bucket.visible = paged_visibility(meta)[index, :width, :most_keys][:, None]
            buckets.append(bucket)
        order = [s for _, seqs in groups for s in seqs]
        inverse = None
        if order != sorted(order):
            rows = _token_rows(cu, order, device)
            inverse = torch.empty_like(rows)
            inverse[rows] = torch.arange(rows.numel(), device=device)
        return _BucketPlan(buckets, inverse)

    return meta.cached(f"bucket_plan_{reuse_new_kv}", build)


def _pad_bucket(x: torch.Tensor, bucket: _Bucket) -> torch.Tensor:
    """[T, H, D] packed tokens -> [C, H, width, D] of the bucket's sequences (zeros after each end)."""
    return _pad_rows(x[bucket.rows], bucket.padded_index, bucket.num_seqs, bucket.width).transpose(1, 2)


def _unpad_bucket(x: torch.Tensor, bucket: _Bucket) -> torch.Tensor:
    """[C, H, width, D] -> [Tb, H, D] in the bucket's token order."""
    x = x.transpose(1, 2).reshape(bucket.num_seqs * bucket.width, *x.shape[1:2], x.shape[-1])
    return x if bucket.padded_index is None else x.index_select(0, bucket.padded_index)


@dataclass
class _PrefixGroup:
    """Continuations of one shared prefix (tokens start:end of the packed stream) attended in one
    padded call: a length bucket of them (`length_buckets`)."""

    start: int
    end: int
    rows: torch.Tensor  # [Tc] packed rows of the continuations' tokens, in order
    lens: list[int]  # tokens of each continuation
    padded_index: torch.Tensor | None  # [Tc] row of each token in [C * max_len]; None: no padding
    mask: torch.Tensor  # [max_len, P + max_len] lower-right causal


@dataclass
class _SharedPrefixPlan:
    """Layer-invariant split of a packed forward with shared prefixes (built once per forward)."""

    plain_rows: torch.Tensor  # rows of sequences that continue no prefix (prefixes included)
    plain_meta: AttentionMetadata | None  # those sequences as their own batch (None: there are none)
    groups: list[_PrefixGroup]
    inverse: torch.Tensor  # [T]: row of each token in cat([plain outputs, *group outputs])


def _shared_prefix_plan(meta: AttentionMetadata) -> _SharedPrefixPlan:
    def build() -> _SharedPrefixPlan:
        device = meta.cu_seqlens_q.device
        cu = meta.cu_seqlens_q.tolist()
        prefix = meta.prefix_seq.tolist()
        plain = [s for s, p in enumerate(prefix) if p < 0]
        continuations: dict[int, list[int]] = {}
        for s, p in enumerate(prefix):
            if p >= 0:
                continuations.setdefault(p, []).append(s)
        plain_rows = _token_rows(cu, plain, device)
        plain_meta = AttentionMetadata.packed([cu[s + 1] - cu[s] for s in plain], device) if plain else None
        groups = []
        for p, seqs in continuations.items():
            num_prefix = cu[p + 1] - cu[p]
            seq_lens = [cu[s + 1] - cu[s] for s in seqs]
            for bucket in length_buckets(seq_lens, [num_prefix + n for n in seq_lens]):
                lens = [seq_lens[i] for i in bucket]
                rows = _token_rows(cu, [seqs[i] for i in bucket], device)
                mask = lower_right_causal_mask(max(lens), num_prefix + max(lens), device)
                groups.append(_PrefixGroup(cu[p], cu[p + 1], rows, lens, _padded_index(lens, device), mask))
        order = torch.cat([plain_rows, *[g.rows for g in groups]])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=device)
        return _SharedPrefixPlan(plain_rows, plain_meta, groups, inverse)

    return meta.cached("shared_prefix_plan", build)


def _pad_continuations(x: torch.Tensor, group: _PrefixGroup) -> torch.Tensor:
    """[Tc, H, D] tokens of a group's continuations -> [C, max_len, H, D] (zeros after each end)."""
    return _pad_rows(x, group.padded_index, len(group.lens), max(group.lens))


def lower_right_causal_mask(num_queries: int, num_keys: int, device) -> torch.Tensor:
    """[n, K] bool: the n queries are the last n of K positions; query i sees keys 0..K - n + i
    (new tokens after a cached context, or a continuation after its shared prefix)."""
    i = torch.arange(num_queries, device=device)[:, None]
    return torch.arange(num_keys, device=device)[None, :] <= num_keys - num_queries + i


class DenseAttention(AttentionBackend):
    """Exact causal attention with torch `scaled_dot_product_attention`.

    Sequences are grouped by length (`length_buckets`): one SDPA call per group of similar
    lengths, padded rows computed and dropped. A sequence with no earlier cached context
    (training, a fresh prefill) attends causally to its own new keys; one that continues a
    cached context reads its keys back from the paged cache under an explicit mask.
    """

    supports_shared_prefix = True

    def forward(self, q, k, v, meta, layer_idx, kv_cache=None):
        if kv_cache is None and meta.prefix_seq is not None:
            return self._with_shared_prefixes(q, k, v, meta, layer_idx)
        if kv_cache is not None:
            kv_cache.write(layer_idx, k, v, meta.slot_mapping)
        plan = _bucket_plan(meta, kv_cache, q.dtype)
        outs = [self._attend_bucket(q, k, v, bucket, kv_cache, layer_idx) for bucket in plan.buckets]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out if plan.inverse is None else out.index_select(0, plan.inverse)

    def _attend_bucket(self, q, k, v, bucket: _Bucket, kv_cache: PagedKVCache | None, layer_idx: int):
        """Attention of one bucket's new tokens -> [Tb, Hq, D] in the bucket's token order."""
        q_pad = _pad_bucket(q, bucket)  # [C, Hq, width, D]
        if bucket.fresh:  # padding sits after each sequence's end: causal masking keeps real rows exact
            out = self._sdpa(q_pad, _pad_bucket(k, bucket), _pad_bucket(v, bucket), is_causal=True)
        else:
            table = bucket.block_table
            num_keys = bucket.visible.shape[-1]
            keys, values = (
                cache[layer_idx][table].flatten(1, 2)[:, :num_keys].to(q.dtype).transpose(1, 2)
                for cache in (kv_cache.k, kv_cache.v)
            )  # [C, Hkv, Lk, D]
            out = self._sdpa(q_pad, keys, values, attn_mask=bucket.visible)
        return _unpad_bucket(out, bucket)

    def _sdpa(self, q, k, v, **kwargs):
        return F.scaled_dot_product_attention(q, k, v, scale=self.scale, enable_gqa=True, **kwargs)

    def _with_shared_prefixes(self, q, k, v, meta, layer_idx):
        """Sequences without a prefix as usual; the continuations of each prefix in one SDPA call
        per length bucket over [prefix keys (shared), own keys], padded to the bucket's longest."""
        plan = _shared_prefix_plan(meta)
        outs = []
        if plan.plain_meta is not None:
            rows = plan.plain_rows
            outs.append(self.forward(q[rows], k[rows], v[rows], plan.plain_meta, layer_idx))
        for group in plan.groups:
            k_prefix, v_prefix = k[group.start : group.end], v[group.start : group.end]
            q_own, k_own, v_own = q[group.rows], k[group.rows], v[group.rows]
            q_pad, k_pad, v_pad = (_pad_continuations(x, group) for x in (q_own, k_own, v_own))
            out = self._continuation(q_pad, k_pad, v_pad, k_prefix, v_prefix, group.mask).flatten(0, 1)
            outs.append(out if group.padded_index is None else out.index_select(0, group.padded_index))
        return torch.cat(outs).index_select(0, plan.inverse)

    def _continuation(self, q, k, v, k_prefix, v_prefix, mask):
        """q/k/v [C, n, H, D] continuing one prefix k/v_prefix [P, Hkv, D] -> [C, n, Hq, D]
        (mask: lower_right_causal_mask(n, P + n))."""
        count = q.shape[0]
        keys = torch.cat([k_prefix.expand(count, *k_prefix.shape), k], dim=1).transpose(1, 2)
        values = torch.cat([v_prefix.expand(count, *v_prefix.shape), v], dim=1).transpose(1, 2)
        return self._sdpa(q.transpose(1, 2), keys, values, attn_mask=mask).transpose(1, 2)


class ReferenceAttention(AttentionBackend):
    """The oracle: a Python loop over sequences with an explicit mask and float32 softmax."""

    supports_shared_prefix = True

    def forward(self, q, k, v, meta, layer_idx, kv_cache=None):
        out = torch.empty_like(q)
        cu = meta.cu_seqlens_q.tolist()
        prefix = meta.prefix_seq.tolist() if meta.prefix_seq is not None else [-1] * meta.num_seqs
        if kv_cache is not None:
            kv_cache.write(layer_idx, k, v, meta.slot_mapping)
            k_ctx, v_ctx = gather_cached_kv(kv_cache, layer_idx, meta)
        for s in range(meta.num_seqs):
            start, end = cu[s], cu[s + 1]
            n = end - start
            if kv_cache is None:
                keys, values, num_before = k[start:end], v[start:end], 0
                if prefix[s] >= 0:  # a continuation: every key of its prefix comes first
                    before = slice(cu[prefix[s]], cu[prefix[s] + 1])
                    keys, values = torch.cat([k[before], keys]), torch.cat([v[before], values])
                    num_before = before.stop - before.start
            else:
                ctx = int(meta.context_lens[s])
                keys, values, num_before = k_ctx[s, :ctx], v_ctx[s, :ctx], ctx - n
            i = torch.arange(n, device=q.device)[:, None]
            j = torch.arange(keys.shape[0], device=q.device)[None, :]
            visible = j < num_before + i + 1
            out[start:end] = masked_attention(
                q[start:end], keys.to(q.dtype), values.to(q.dtype), visible, self.scale
            )
        return out


register_attention_backend("dense", DenseAttention)
register_attention_backend("reference", ReferenceAttention)
