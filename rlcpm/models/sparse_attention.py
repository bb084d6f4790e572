"""The `sparse` attention backend: InfLLM v2 trainable sparse attention (SPECS §2).

Same parameters as dense attention (no extra weights); per query token and KV group it
attends only the top-k 64-token blocks chosen by stage 1 (rlcpm.kernels.infllm_v2). Settings
come from the checkpoint's `sparse_config` (MiniCPM4) or, when that is absent, MiniCPM4's
defaults; a recipe's `model.sparse_attention` overrides them (`load_model(..., sparse_config=)`).

The dense_len switch is applied per query: a query at position i sees i + 1 keys and attends
densely iff i + 1 < dense_len. Decoding at position i therefore does exactly what the learner's
packed forward does for token i (the reference code switches per sequence on the prefill
length, so its prefill and its decode can disagree for tokens before dense_len; here they
cannot). A batch with no sparse query is handed to the dense backend unchanged.

- Packed training (no cache): Kc1/Kc2 by batch compression of the detached keys, selection,
  then stage 2 with gradients to q, k, v.
- Paged cache (engine): new K/V are written first, then the compressed keys of the windows
  they complete (rlcpm.kernels.infllm_v2.PagedCompressedKeys, kept beside the KV cache and
  owned by this backend), then selection and stage 2 over the cache; one new token per
  sequence takes the split-KV decode kernel.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from rlcpm.errors import EngineError
from rlcpm.kernels.infllm_v2 import (
    InfLLMv2Config,
    KeyLayout,
    PagedCompressedKeys,
    block_sparse_attention,
    compress_keys,
    mean_pool_windows,
    select_blocks,
    sparse_decode_attention,
)
from rlcpm.models.attention import AttentionBackend, register_attention_backend
from rlcpm.models.dense_attention import DenseAttention
from rlcpm.models.kv_cache import PagedKVCache
from rlcpm.models.metadata import AttentionMetadata


@dataclass
class QueryPlan:
    """Which query tokens of one forward take the sparse path (layer-invariant, built once)."""

    q_seq: torch.Tensor  # [Ts] sequence of each sparse query
    q_pos: torch.Tensor  # [Ts] its absolute position
    sparse_rows: torch.Tensor | None = None  # their rows among all queries; None: every row
    dense_rows: torch.Tensor | None = None  # the other rows: a prefix of each sequence's queries
    dense_meta: AttentionMetadata | None = None  # metadata of the dense rows as their own batch

    @property
    def is_all_sparse(self) -> bool:
        return self.sparse_rows is None

    @property
    def is_all_dense(self) -> bool:
        return self.sparse_rows is not None and self.sparse_rows.numel() == 0


class SparseAttention(AttentionBackend):
    """InfLLM v2 attention; see the module docstring."""

    def __init__(self, config):
        super().__init__(config)
        self.sparse = InfLLMv2Config.from_dict(config.sparse_config)
        self.dense = DenseAttention(config)
        # Compressed keys (Kc1, Kc2) of every engine KV cache this backend has attended over.
        self._compressed: weakref.WeakKeyDictionary[PagedKVCache, tuple[PagedCompressedKeys, ...]] = (
            weakref.WeakKeyDictionary()
        )

    # ------------------------------------------------------------------------------ forward

    def forward(self, q, k, v, meta, layer_idx, kv_cache=None):
        # Cached per forward (layer-invariant), keyed by the settings it depends on.
        plan = meta.cached(f"infllm_v2_queries:{self.sparse.dense_len}", lambda: self._query_plan(meta))
        if plan.is_all_dense:  # no query reaches dense_len
            out = self.dense.forward(q, k, v, meta, layer_idx, kv_cache)
            if kv_cache is not None:  # keep Kc1/Kc2 current for the steps that will be sparse
                self._update_compressed(meta, layer_idx, kv_cache)
            return out
        if kv_cache is None:
            out_sparse = self._packed(q, k, v, meta, plan)
        else:
            out_sparse = self._paged(q, k, v, meta, layer_idx, kv_cache, plan)
        if plan.is_all_sparse:
            return out_sparse
        rows = plan.dense_rows
        out_dense = self.dense.forward(q[rows], k[rows], v[rows], plan.dense_meta, layer_idx, kv_cache)
        return torch.zeros_like(q).index_copy(0, plan.sparse_rows, out_sparse).index_copy(0, rows, out_dense)

    def _packed(self, q, k, v, meta, plan: QueryPlan):
        cfg = self.sparse
        cu = meta.cu_seqlens_q
        kc1, cu1 = compress_keys(k, cu, cfg.kernel_size, cfg.kernel_stride)
        kc2, cu2 = compress_keys(k, cu, cfg.coarse_kernel_size, cfg.coarse_kernel_stride)
        return self._attend(q, k, v, KeyLayout.packed(cu), (kc1, cu1, kc2, cu2), plan, is_decode=False)

    def _paged(self, q, k, v, meta, layer_idx, kv_cache, plan: QueryPlan):
        if kv_cache.dtype != q.dtype:
            raise EngineError(
                f"sparse attention needs the KV cache in the model dtype: cache {kv_cache.dtype}, queries {q.dtype}"
            )
        kv_cache.write(layer_idx, k, v, meta.slot_mapping)
        keys, values = kv_cache.flat(layer_idx)
        (kc1, cu1), (kc2, cu2) = self._update_compressed(meta, layer_idx, kv_cache)
        layout = KeyLayout.paged(meta.block_tables, kv_cache.block_size)
        is_decode = meta.is_decode and plan.is_all_sparse
        return self._attend(q, keys, values, layout, (kc1, cu1, kc2, cu2), plan, is_decode)

    def _attend(self, q, keys, values, layout, compressed, plan: QueryPlan, is_decode: bool):
        """Selection + stage 2 for the sparse query rows."""
        q_sparse = q if plan.is_all_sparse else q[plan.sparse_rows]
        q_seq, q_pos = plan.q_seq, plan.q_pos
        block_idx = select_blocks(q_sparse, q_seq, q_pos, *compressed, self.sparse, self.scale)
        block = self.sparse.block_size
        if is_decode:
            return sparse_decode_attention(
                q_sparse, keys, values, layout, q_pos, block_idx, block, self.scale
            )
        return block_sparse_attention(
            q_sparse, keys, values, layout, q_seq, q_pos, block_idx, block, self.scale
        )

    # ------------------------------------------------------------------------- bookkeeping

    def _update_compressed(self, meta, layer_idx, kv_cache):
        """Compress the windows completed by this step's keys (already in the cache); returns
        every sequence's packed (Kc1, cu1), (Kc2, cu2)."""
        tiers = self._tiers(kv_cache)
        cfg = self.sparse
        steps = meta.cached(
            f"infllm_v2_compression:{cfg.kernel_size}:{cfg.kernel_stride}:{kv_cache.block_size}",
            lambda: [t.plan(meta.block_tables, meta.context_lens, meta.seq_lens_q) for t in tiers],
        )
        keys = kv_cache.flat(layer_idx)[0]
        for tier, step in zip(tiers, steps):
            tier.update(layer_idx, keys, step, mean_pool_windows)
        return [tier.gather(layer_idx, step) for tier, step in zip(tiers, steps)]

    def _tiers(self, kv_cache: PagedKVCache) -> tuple[PagedCompressedKeys, PagedCompressedKeys]:
        if kv_cache not in self._compressed:
            cfg = self.sparse
            self._compressed[kv_cache] = (
                PagedCompressedKeys(kv_cache, cfg.kernel_size, cfg.kernel_stride),
                PagedCompressedKeys(kv_cache, cfg.coarse_kernel_size, cfg.coarse_kernel_stride),
            )
        return self._compressed[kv_cache]

    def _query_plan(self, meta: AttentionMetadata) -> QueryPlan:
        q_seq = meta.seq_ids()
        offsets = meta.offsets_in_seq()
        if meta.has_cache:
            q_pos = (meta.context_lens.long() - meta.seq_lens_q)[q_seq] + offsets
        else:
            q_pos = offsets
        is_dense = self.sparse.is_dense_query(q_pos)
        if not bool(is_dense.any()):
            return QueryPlan(q_seq, q_pos)
        sparse_rows = (~is_dense).nonzero().squeeze(1)
        if sparse_rows.numel() == 0:
            return QueryPlan(q_seq[sparse_rows], q_pos[sparse_rows], sparse_rows)
        # A sequence's dense queries are its first new tokens: a smaller batch for the dense backend.
        dense_rows = is_dense.nonzero().squeeze(1)
        counts = torch.bincount(q_seq[dense_rows], minlength=meta.num_seqs)
        keep = counts > 0
        cu = torch.zeros(int(keep.sum()) + 1, dtype=torch.int32, device=q_pos.device)
        cu[1:] = torch.cumsum(counts[keep], 0)
        if meta.has_cache:
            context = (meta.context_lens.long() - meta.seq_lens_q + counts)[keep]
            dense_meta = AttentionMetadata(
                cu_seqlens_q=cu,
                context_lens=context.to(torch.int32),
                slot_mapping=torch.full((dense_rows.numel(),), -1, dtype=torch.int64, device=q_pos.device),
                block_tables=meta.block_tables[keep],
            )  # slots -1: the K/V are in the cache already
        else:
            dense_meta = AttentionMetadata(cu_seqlens_q=cu)
        return QueryPlan(q_seq[sparse_rows], q_pos[sparse_rows], sparse_rows, dense_rows, dense_meta)


register_attention_backend("sparse", SparseAttention)
