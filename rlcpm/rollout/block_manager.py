"""Paged KV blocks: allocation, reference counts, and prefix sharing by block hashes.

The KV cache is ``num_blocks`` blocks of ``block_size`` token slots. A sequence owns a block
table (block ids in token order). A *full* block whose KV has been scheduled for computation
is registered under a hash chained over every token before it, ``key_i = hash((key_{i-1},
tokens_i))``; a later sequence with the same leading tokens takes those blocks (ref count + 1)
instead of computing them, so the G samples of one prompt prefill it once. Shared blocks are
always full and never written again, so no copy-on-write is needed: each sequence writes its
partial last block itself (at most block_size - 1 tokens computed per sample twice).
Freed blocks keep their registration until reused (least recently freed first), so prefixes
stay cached across requests while memory allows; ``reset_prefix_cache`` forgets every
registration (new weights make cached KV stale).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from rlcpm.rollout.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    key: int | None = None
    parent_key: int | None = None
    token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be > 0, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.key_to_block_id: dict[int, int] = {}
        self.block_keys: dict[int, list[int]] = {}  # seq_id -> chain keys of its full blocks
        self.num_prefix_hits = 0  # blocks reused by admitted sequences (the scheduler counts them)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Fresh blocks seq needs so that its first ``num_tokens`` tokens have KV slots."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_reserve(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def reserve(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self._take_fresh_block())

    def share_cached_prefix(self, seq: Sequence) -> int:
        """Give a sequence without KV the cached blocks of its leading tokens; returns tokens reused.

        At least the last token is left to compute (its logits are needed).
        """
        assert not seq.block_table, "prefix sharing is for sequences without blocks"
        keys = self.block_keys.setdefault(seq.seq_id, [])
        parent = None
        for index in range((len(seq) - 1) // self.block_size):
            tokens = seq.block_tokens(index)
            key = hash((parent, tokens))
            block_id = self.key_to_block_id.get(key)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.parent_key != parent or block.token_ids != tokens:
                break  # hash collision: treat as a miss
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            keys.append(key)
            parent = key
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        return seq.num_computed_tokens

    def register_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Register the full blocks among seq's first ``num_tokens`` tokens for sharing.

        Called when their KV is scheduled: the forward that computes them writes every
        sequence's new KV before any attention reads the cache, so a sequence admitted in the
        same step may already share them.
        """
        keys = self.block_keys.setdefault(seq.seq_id, [])
        for index in range(len(keys), num_tokens // self.block_size):
            parent = keys[-1] if keys else None
            tokens = seq.block_tokens(index)
            key = hash((parent, tokens))
            keys.append(key)
            if key in self.key_to_block_id:
                continue  # the same content is registered already (another block)
            block = self.blocks[seq.block_table[index]]
            block.key, block.parent_key, block.token_ids = key, parent, tokens
            self.key_to_block_id[key] = block.block_id

    def free(self, seq: Sequence) -> None:
        """Drop seq's references; blocks keep their registration until reused."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.kv_epoch += 1
        self.block_keys.pop(seq.seq_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget every registration (the cached KV no longer matches the weights)."""
        for block in self.blocks:
            block.key, block.parent_key, block.token_ids = None, None, ()
        self.key_to_block_id.clear()

    def _take_fresh_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.key is not None and self.key_to_block_id.get(block.key) == block_id:
            del self.key_to_block_id[block.key]
        block.key, block.parent_key, block.token_ids = None, None, ()
        block.ref_count = 1
        return block_id
