"""Dense attention backends: `dense` (torch SDPA) and `reference` (a readable masked softmax).

Both implement the same contract (rlcpm.models.attention.AttentionBackend):

- packed training, no cache: query i of a sequence sees keys 0..i of the same sequence;
- paged cache: new K/V are written at `meta.slot_mapping` first; new query i of sequence s
  (0-based among its n_s new tokens) then sees cached keys j < context_lens[s] - n_s + i + 1.

- packed with shared prefixes (`meta.prefix_seq`): a sequence continuing prefix p sees every
  key of p, then its own keys causally (one prompt, stored once, for all its responses).

`dense` pads a batch of similar-length sequences into [S, max_len] with one scatter and runs
one `scaled_dot_product_attention` call (padded query rows are computed and dropped); when
padding would more than double the work (ragged lengths) it runs one call per sequence
instead. No Python loop over tokens. `reference` loops over sequences and spells the mask
out; it is the oracle in tests.
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


def _padded_index(meta: AttentionMetadata) -> torch.Tensor | None:
    """[T] row of each token in the padded [S * max_q] layout; None when nothing is padded."""

    def build() -> torch.Tensor | None:
        if meta.num_tokens == meta.num_seqs * meta.max_seqlen_q:
            return None
        return meta.seq_ids() * meta.max_seqlen_q + meta.offsets_in_seq()

    return meta.cached("padded_index", build)


def _pad(x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """[T, H, D] -> [S, H, max_q, D] (zeros in padded rows)."""
    index = _padded_index(meta)
    rows = meta.num_seqs * meta.max_seqlen_q
    if index is not None:
        x = x.new_zeros(rows, *x.shape[1:]).index_copy(0, index, x)
    return x.view(meta.num_seqs, meta.max_seqlen_q, *x.shape[1:]).transpose(1, 2)


def _unpad(x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """[S, H, max_q, D] -> [T, H, D]."""
    x = x.transpose(1, 2).reshape(meta.num_seqs * meta.max_seqlen_q, *x.shape[1:2], x.shape[-1])
    index = _padded_index(meta)
    return x if index is None else x.index_select(0, index)


def is_padding_cheap(meta: AttentionMetadata) -> bool:
    """Batch all sequences in one padded SDPA call when that does at most twice the real work
    (query x key pairs); otherwise loop over sequences (ragged lengths: no quadratic waste)."""

    def decide() -> bool:
        n = meta.seq_lens_q.tolist()
        keys = meta.context_lens.tolist() if meta.has_cache else n
        padded = len(n) * max(n) * max(keys)
        return padded <= 2 * sum(a * b for a, b in zip(n, keys))

    return meta.cached("is_padding_cheap", decide)


@dataclass
class _PrefixGroup:
    """A shared prefix (tokens start:end of the packed stream) and the sequences continuing it."""

    start: int
    end: int
    rows: torch.Tensor  # [Tc] packed rows of the continuations' tokens, in order
    lens: list[int]  # tokens of each continuation
    padded_index: torch.Tensor | None  # [Tc] row of each token in [C * max_len]; None: one call each
    masks: list[torch.Tensor]  # one [n, P + n] mask for the padded call, else one per continuation


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
        rows_of = lambda s: torch.arange(cu[s], cu[s + 1], device=device)  # noqa: E731
        plain = [s for s, p in enumerate(prefix) if p < 0]
        continuations: dict[int, list[int]] = {}
        for s, p in enumerate(prefix):
            if p >= 0:
                continuations.setdefault(p, []).append(s)
        plain_rows = (
            torch.cat([rows_of(s) for s in plain])
            if plain
            else torch.zeros(0, dtype=torch.long, device=device)
        )
        plain_meta = AttentionMetadata.packed([cu[s + 1] - cu[s] for s in plain], device) if plain else None
        groups = []
        for p, seqs in continuations.items():
            lens = [cu[s + 1] - cu[s] for s in seqs]
            width = max(lens)
            num_prefix = cu[p + 1] - cu[p]
            padded = len(lens) * width * (num_prefix + width)
            real = sum(n * (num_prefix + n) for n in lens)
            padded_index = None
            masks = [lower_right_causal_mask(n, num_prefix + n, device) for n in lens]
            if padded <= 2 * real:
                padded_index = torch.cat(
                    [torch.arange(n, device=device) + i * width for i, n in enumerate(lens)]
                )
                masks = [lower_right_causal_mask(width, num_prefix + width, device)]
            rows = torch.cat([rows_of(s) for s in seqs])
            groups.append(_PrefixGroup(cu[p], cu[p + 1], rows, lens, padded_index, masks))
        order = torch.cat([plain_rows, *[g.rows for g in groups]])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=device)
        return _SharedPrefixPlan(plain_rows, plain_meta, groups, inverse)

    return meta.cached("shared_prefix_plan", build)


def _pad_continuations(x: torch.Tensor, group: _PrefixGroup) -> torch.Tensor:
    """[Tc, H, D] tokens of a group's continuations -> [C, max_len, H, D] (zeros after each end)."""
    count, width = len(group.lens), max(group.lens)
    padded = x.new_zeros(count * width, *x.shape[1:]).index_copy(0, group.padded_index, x)
    return padded.view(count, width, *x.shape[1:])


def lower_right_causal_mask(num_queries: int, num_keys: int, device) -> torch.Tensor:
    """[n, K] bool: the n queries are the last n of K positions; query i sees keys 0..K - n + i
    (new tokens after a cached context, or a continuation after its shared prefix)."""
    i = torch.arange(num_queries, device=device)[:, None]
    return torch.arange(num_keys, device=device)[None, :] <= num_keys - num_queries + i


class DenseAttention(AttentionBackend):
    """Exact causal attention with torch `scaled_dot_product_attention`.

    Batched over sequences when their lengths are similar (padded rows are computed and
    dropped), one call per sequence when padding would more than double the work.
    """

    supports_shared_prefix = True

    def forward(self, q, k, v, meta, layer_idx, kv_cache=None):
        if kv_cache is None and meta.prefix_seq is not None:
            return self._with_shared_prefixes(q, k, v, meta, layer_idx)
        if kv_cache is None:
            if meta.num_seqs == 1 or not is_padding_cheap(meta):
                return self._per_sequence(q, k, v, meta)
            # Ragged sequences padded at their ends: causal masking keeps the real rows exact.
            out = self._sdpa(_pad(q, meta), _pad(k, meta), _pad(v, meta), is_causal=True)
            return _unpad(out, meta)
        kv_cache.write(layer_idx, k, v, meta.slot_mapping)
        if not is_padding_cheap(meta):
            return self._per_sequence_cached(q, kv_cache, layer_idx, meta)
        k_ctx, v_ctx = gather_cached_kv(kv_cache, layer_idx, meta)  # [S, Lk, Hkv, D]
        k_ctx, v_ctx = k_ctx.to(q.dtype).transpose(1, 2), v_ctx.to(q.dtype).transpose(1, 2)
        mask = paged_visibility(meta)[:, None]  # [S, 1, max_q, Lk]
        if meta.is_decode:  # one new token per sequence: no padding, q [S, Hq, 1, D]
            return self._sdpa(q[:, :, None], k_ctx, v_ctx, attn_mask=mask)[:, :, 0]
        return _unpad(self._sdpa(_pad(q, meta), k_ctx, v_ctx, attn_mask=mask), meta)

    def _sdpa(self, q, k, v, **kwargs):
        return F.scaled_dot_product_attention(q, k, v, scale=self.scale, enable_gqa=True, **kwargs)

    def _with_shared_prefixes(self, q, k, v, meta, layer_idx):
        """Sequences without a prefix as usual; the continuations of each prefix in one SDPA call
        over [prefix keys (shared), own keys] (padded to the longest, or one call each when
        padding would more than double the work)."""
        plan = _shared_prefix_plan(meta)
        outs = []
        if plan.plain_meta is not None:
            rows = plan.plain_rows
            outs.append(self.forward(q[rows], k[rows], v[rows], plan.plain_meta, layer_idx))
        for group in plan.groups:
            k_prefix, v_prefix = k[group.start : group.end], v[group.start : group.end]
            q_own, k_own, v_own = q[group.rows], k[group.rows], v[group.rows]
            if group.padded_index is None:
                outs += [
                    self._continuation(qs[None], ks[None], vs[None], k_prefix, v_prefix, mask)[0]
                    for qs, ks, vs, mask in zip(
                        q_own.split(group.lens), k_own.split(group.lens), v_own.split(group.lens), group.masks
                    )
                ]
                continue
            q_pad, k_pad, v_pad = (_pad_continuations(x, group) for x in (q_own, k_own, v_own))
            out = self._continuation(
                q_pad, k_pad, v_pad, k_prefix, v_prefix, group.masks[0]
            )  # [C, width, Hq, D]
            outs.append(out.flatten(0, 1).index_select(0, group.padded_index))
        return torch.cat(outs).index_select(0, plan.inverse)

    def _continuation(self, q, k, v, k_prefix, v_prefix, mask):
        """q/k/v [C, n, H, D] continuing one prefix k/v_prefix [P, Hkv, D] -> [C, n, Hq, D]
        (mask: lower_right_causal_mask(n, P + n))."""
        count = q.shape[0]
        keys = torch.cat([k_prefix.expand(count, *k_prefix.shape), k], dim=1).transpose(1, 2)
        values = torch.cat([v_prefix.expand(count, *v_prefix.shape), v], dim=1).transpose(1, 2)
        return self._sdpa(q.transpose(1, 2), keys, values, attn_mask=mask).transpose(1, 2)

    def _per_sequence(self, q, k, v, meta):
        """Causal attention of each packed sequence on its own: [T, H, D] -> [T, Hq, D]."""
        lens = meta.seq_lens_q.tolist()
        outs = [
            self._sdpa(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1), is_causal=True).transpose(
                0, 1
            )
            for qs, ks, vs in zip(q.split(lens), k.split(lens), v.split(lens))
        ]
        return torch.cat(outs)

    def _per_sequence_cached(self, q, kv_cache, layer_idx, meta):
        """Each sequence's n new queries against its own cached keys (no cross-sequence padding)."""
        lens = meta.seq_lens_q.tolist()
        contexts = meta.context_lens.tolist()
        block_size = kv_cache.block_size
        outs = []
        for s, (qs, n, ctx) in enumerate(zip(q.split(lens), lens, contexts)):
            blocks = meta.block_tables[s, : -(-ctx // block_size)].long()
            ks = (
                kv_cache.k[layer_idx][blocks].flatten(0, 1)[:ctx].to(q.dtype).transpose(0, 1)
            )  # [Hkv, ctx, D]
            vs = kv_cache.v[layer_idx][blocks].flatten(0, 1)[:ctx].to(q.dtype).transpose(0, 1)
            visible = lower_right_causal_mask(n, ctx, q.device)  # [n, ctx]
            outs.append(self._sdpa(qs.transpose(0, 1), ks, vs, attn_mask=visible).transpose(0, 1))
        return torch.cat(outs)


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
