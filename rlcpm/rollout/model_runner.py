"""One engine step on the model: scheduled batch -> packed tensors + AttentionMetadata -> one
forward over the paged KV cache -> logits at each sampling sequence's last new token.

The forward is the model's own, or, for float32 CPU models with dense attention, the engine's
FusedDecoder over the same parameters (rlcpm.rollout.fused_decoder)."""

from __future__ import annotations

import torch

from rlcpm.models.kv_cache import PagedKVCache
from rlcpm.models.metadata import AttentionMetadata
from rlcpm.rollout.decode_attention import install_mirrored_decode_attention
from rlcpm.rollout.fused_decoder import FusedDecoder
from rlcpm.rollout.scheduler import ScheduledBatch


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: PagedKVCache,
        decode_mirror: bool = True,
        fused: bool = True,
        pack_linears: bool = True,
    ):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = kv_cache.device
        self.decode_backend = install_mirrored_decode_attention(model) if decode_mirror else None
        self.fused = FusedDecoder(model, pack=pack_linears) if fused else None  # caller checked can_fuse

    def prepare(
        self, batch: ScheduledBatch
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """(input_ids [T], positions [T], metadata, row of each sampling sequence's last token)."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        cu_seqlens = [0]
        sample_rows: list[int] = []
        block_size = self.block_size
        for index, seq in enumerate(batch.seqs):
            start = seq.num_computed_tokens
            end = start + batch.num_query_tokens[index]
            table = seq.block_table
            if end - start == 1:  # decode: the common case, kept cheap
                input_ids.append(seq.token_ids[start])
                positions.append(start)
                slots.append(table[start // block_size] * block_size + start % block_size)
            else:
                input_ids.extend(seq.token_ids[start:end])
                positions.extend(range(start, end))
                slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
            context_lens.append(end)
            cu_seqlens.append(cu_seqlens[-1] + end - start)
            if end == len(seq):
                sample_rows.append(cu_seqlens[-1] - 1)
        max_blocks = max(len(seq.block_table) for seq in batch.seqs)
        tables = [seq.block_table + [0] * (max_blocks - len(seq.block_table)) for seq in batch.seqs]
        device = self.device
        meta = AttentionMetadata(
            cu_seqlens_q=torch.tensor(cu_seqlens, dtype=torch.int32, device=device),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
            max_seqlen_q=max(batch.num_query_tokens),
            max_context_len=max(context_lens),
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=device)
        pos = torch.tensor(positions, dtype=torch.long, device=device)
        return ids, pos, meta, sample_rows

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [N, V] at the last token of the N sequences that sample this step (may be 0)."""
        ids, positions, meta, sample_rows = self.prepare(batch)
        if self.decode_backend is not None:
            keys = [(seq.seq_id, seq.kv_epoch) for seq in batch.seqs[: batch.num_steady_decodes]]
            self.decode_backend.prepare(self.kv_cache, meta, keys)
        if self.fused is not None:
            rows = None
            if len(sample_rows) != ids.shape[0]:
                rows = torch.tensor(sample_rows, dtype=torch.long, device=ids.device)
            return self.fused(ids, positions, meta, self.kv_cache, rows)
        hidden = self.model(ids, positions, meta=meta, kv_cache=self.kv_cache, return_hidden=True)  # [T, H]
        if len(sample_rows) != hidden.shape[0]:
            hidden = hidden[torch.tensor(sample_rows, dtype=torch.long, device=hidden.device)]
        return self.model.compute_logits(hidden)  # [N, V]
