"""Paged blocks: reservation, ref counts, prefix sharing by chained block hashes, LRU reuse."""

from __future__ import annotations

from rlcpm.rollout.block_manager import BlockManager
from rlcpm.rollout.sampling import SamplingParams
from rlcpm.rollout.sequence import Request, Sequence


def _seq(seq_id: int, tokens: list[int], block_size: int = 4) -> Sequence:
    return Sequence(seq_id, Request(seq_id, tokens), SamplingParams(), seed=0, block_size=block_size)


def test_reserve_takes_only_the_missing_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = _seq(0, list(range(10)))
    assert bm.blocks_needed(seq, 10) == 3
    bm.reserve(seq, 6)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 6
    bm.reserve(seq, 10)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    assert not bm.can_reserve(seq, 4 * 9)
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == [] and seq.num_computed_tokens == 0


def test_samples_of_one_prompt_share_its_full_blocks_and_compute_their_tail():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(100, 111))  # 11 tokens: 2 full blocks + 3
    first = _seq(0, prompt)
    assert bm.share_cached_prefix(first) == 0
    bm.reserve(first, 11)
    bm.register_full_blocks(first, 11)
    second = _seq(1, prompt)
    assert bm.share_cached_prefix(second) == 8
    assert second.block_table == first.block_table[:2]
    assert [bm.blocks[b].ref_count for b in first.block_table] == [2, 2, 1]
    bm.reserve(second, 11)
    assert second.block_table[2] != first.block_table[2]  # partial last block is private
    # a prompt that differs inside block 1 shares block 0 only (hashes chain over the prefix)
    third = _seq(2, prompt[:5] + [0] + prompt[6:])
    assert bm.share_cached_prefix(third) == 4


def test_a_fully_cached_prompt_still_computes_its_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(8))
    first = _seq(0, prompt)
    bm.reserve(first, 8)
    bm.register_full_blocks(first, 8)
    second = _seq(1, prompt)
    assert bm.share_cached_prefix(second) == 4  # block 1 holds the last token: recomputed


def test_freed_blocks_stay_cached_until_reused_least_recently_freed_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    seq = _seq(0, [1, 2, 3, 4, 5], 2)
    bm.reserve(seq, 5)
    bm.register_full_blocks(seq, 5)
    bm.free(seq)
    again = _seq(1, [1, 2, 3, 4, 5], 2)
    assert bm.share_cached_prefix(again) == 4 and bm.num_free_blocks == 2
    bm.free(again)
    # taking 3 fresh blocks evicts the unregistered block and the tail block (1) first
    other = _seq(2, [9, 9, 9, 9, 9, 9], 2)
    bm.reserve(other, 6)
    assert bm.share_cached_prefix(_seq(3, [1, 2, 3], 2)) == 2
    bm.free(other)
    bm.reset_prefix_cache()
    assert bm.share_cached_prefix(_seq(4, [1, 2, 3, 4, 5], 2)) == 0


def test_registration_is_idempotent_and_skips_content_registered_by_another_block():
    bm = BlockManager(num_blocks=8, block_size=2)
    a, b = _seq(0, [1, 2, 3], 2), _seq(1, [1, 2, 3], 2)
    bm.reserve(a, 3)
    bm.reserve(b, 3)
    bm.register_full_blocks(a, 3)
    bm.register_full_blocks(a, 3)
    bm.register_full_blocks(b, 3)
    assert bm.share_cached_prefix(_seq(2, [1, 2, 3], 2)) == 2
    assert bm.blocks[a.block_table[0]].ref_count == 2 and bm.blocks[b.block_table[0]].ref_count == 1
