"""Incremental inference through the paged KV cache equals the full forward at every position."""

from __future__ import annotations

import random

import pytest
import torch

from rlcpm.errors import EngineError
from rlcpm.models import AttentionMetadata, PagedKVCache

SEQ_LENS = [13, 5, 22]


def _run_incremental(model, seqs, chunk_sizes, block_size, seed=0):
    """Feed every sequence through the cache in chunks (chunk_sizes[step][s] new tokens).

    Blocks are handed out in a shuffled order so block tables are not contiguous. Returns the
    logits of every position of every sequence, concatenated per sequence.
    """
    rng = random.Random(seed)
    num_blocks = sum(-(-len(s) // block_size) for s in seqs) + 3
    cache = model.new_kv_cache(num_blocks=num_blocks, block_size=block_size)
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-len(s) // block_size))] for s in seqs]
    done = [0] * len(seqs)
    outs: list[list[torch.Tensor]] = [[] for _ in seqs]
    step = 0
    while any(d < len(s) for d, s in zip(done, seqs)):
        active = [i for i, s in enumerate(seqs) if done[i] < len(s)]
        sizes = chunk_sizes(step)
        new = [min(sizes[i % len(sizes)], len(seqs[i]) - done[i]) for i in active]
        ctx = [done[i] + n for i, n in zip(active, new)]
        meta = AttentionMetadata.paged(new, ctx, [tables[i] for i in active], block_size)
        ids = torch.cat([seqs[i][done[i] : c] for i, c in zip(active, ctx)])
        positions = torch.cat([torch.arange(done[i], c) for i, c in zip(active, ctx)])
        logits = model(ids, positions, meta=meta, kv_cache=cache)
        assert logits.shape == (sum(new), model.config.vocab_size)
        for i, part in zip(active, logits.split(new)):
            outs[i].append(part)
        for i, c in zip(active, ctx):
            done[i] = c
        step += 1
    return [torch.cat(o) for o in outs]


SCHEDULES = {
    "one-token": lambda step: [1],
    "k-tokens": lambda step: [3],
    "prefill-then-decode": lambda step: [6, 9, 4] if step == 0 else [1],
    "mixed": lambda step: [[5, 1, 2], [1, 4, 1], [2, 2, 7]][step % 3],
    # One long chunk among single tokens: ragged enough for the per-sequence path.
    "chunk-among-decodes": lambda step: [[1, 9, 1], [1], [1, 1, 12], [1]][step % 4],
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("block_size", [4, 5])
def test_incremental_equals_full_forward(schedule, block_size, make_model, random_ids):
    model = make_model("qwen3", num_key_value_heads=2)
    seqs = [random_ids(n, seed=i) for i, n in enumerate(SEQ_LENS)]
    with torch.no_grad():
        incremental = _run_incremental(model, seqs, SCHEDULES[schedule], block_size)
        for seq, got in zip(seqs, incremental):
            full = model(seq[None])[0]
            assert (got - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "minicpm"])
@pytest.mark.parametrize("backend", ["dense", "reference"])
def test_incremental_every_architecture_and_backend(model_type, backend, make_model, random_ids):
    model = make_model(model_type, num_key_value_heads=1 if model_type == "llama" else 4)
    model.set_attention_backend(backend)
    seqs = [random_ids(n, seed=10 + i) for i, n in enumerate(SEQ_LENS)]
    with torch.no_grad():
        incremental = _run_incremental(model, seqs, SCHEDULES["mixed"], block_size=3)
        for seq, got in zip(seqs, incremental):
            assert (got - model(seq[None])[0]).abs().max().item() <= 1e-5


def test_paged_metadata_slot_mapping_by_hand():
    # Sequence 0: 2 cached + 3 new tokens in blocks [7, 2] (block_size 4) -> positions 2, 3, 4.
    # Sequence 1: 5 cached + 1 new in blocks [0, 5] -> position 5.
    meta = AttentionMetadata.paged([3, 1], [5, 6], [[7, 2], [0, 5]], block_size=4)
    assert meta.slot_mapping.tolist() == [7 * 4 + 2, 7 * 4 + 3, 2 * 4 + 0, 5 * 4 + 1]
    assert meta.cu_seqlens_q.tolist() == [0, 3, 4]
    assert meta.context_lens.tolist() == [5, 6]
    assert meta.max_seqlen_q == 3 and not meta.is_decode
    assert AttentionMetadata.paged([1, 1], [3, 9], [[1], [2, 3, 4]], block_size=4).is_decode


def test_length_buckets_by_hand():
    from rlcpm.models.dense_attention import length_buckets

    # Ragged training lengths: padding any two together costs > 1.25x their real work.
    assert length_buckets([7, 1, 19, 4, 12], [7, 1, 19, 4, 12]) == [[2], [4], [0], [3], [1]]
    # Similar lengths share one call: padded 4 * 11 * 11 = 484 <= 1.25 * (81 + 121 + 100 + 121).
    assert length_buckets([9, 11, 10, 11], [9, 11, 10, 11]) == [[1, 3, 2, 0]]
    # Decode steps (one new token) over similar contexts: one call, longest context first.
    assert length_buckets([1, 1, 1], [10, 12, 11]) == [[1, 2, 0]]
    # Two long carried-over prefixes beside short prompts: two calls, not one per sequence and
    # not the short ones padded to 300.
    assert length_buckets([300, 12, 12, 280, 12], [300, 12, 12, 280, 12]) == [[0, 3], [1, 2, 4]]


def test_negative_slots_are_not_stored():
    cache = PagedKVCache(num_layers=1, num_blocks=2, block_size=2, num_kv_heads=1, head_dim=3)
    k = torch.arange(1, 10, dtype=torch.float32).view(3, 1, 3)
    cache.write(0, k, -k, torch.tensor([3, -1, 0]))
    k_flat, v_flat = cache.flat(0)
    assert torch.equal(k_flat[3], k[0]) and torch.equal(k_flat[0], k[2])
    assert torch.equal(v_flat[0], -k[2])
    assert k_flat[1].abs().sum() == 0 and k_flat[2].abs().sum() == 0


def test_bytes_per_block_by_hand():
    cache = PagedKVCache(
        num_layers=3, num_blocks=2, block_size=16, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16
    )
    assert cache.bytes_per_block == 2 * 3 * 16 * 2 * 8 * 2  # K+V, layers, slots, heads, dim, bytes
    assert cache.k[2].shape == (2, 16, 2, 8)
    assert cache.storage.numel() * 2 == cache.bytes_per_block * cache.num_blocks


def test_copy_on_write_prefix_sharing(make_model, random_ids):
    """Two sequences share the blocks of a common prefix; the partly filled last block is copied
    before the second sequence writes into it. Both continue exactly like full forwards."""
    model = make_model("llama")
    block_size = 4
    prefix = random_ids(6, seed=1)  # one full block + half a block
    tails = [random_ids(5, seed=2), random_ids(3, seed=3)]
    cache = model.new_kv_cache(num_blocks=8, block_size=block_size)
    with torch.no_grad():
        meta = AttentionMetadata.paged([6], [6], [[0, 1]], block_size)
        model(prefix, torch.arange(6), meta=meta, kv_cache=cache)
        cache.copy_blocks([1], [2])  # copy-on-write of the shared, partly filled block
        tables = [[0, 1, 3], [0, 2, 4]]  # block 0 shared; sequence 1 owns the copy (2)
        meta = AttentionMetadata.paged([5, 3], [11, 9], tables, block_size)
        ids = torch.cat(tails)
        positions = torch.cat([torch.arange(6, 11), torch.arange(6, 9)])
        got = model(ids, positions, meta=meta, kv_cache=cache).split([5, 3])
        for tail, logits in zip(tails, got):
            full = model(torch.cat([prefix, tail])[None])[0, 6:]
            assert (logits - full).abs().max().item() <= 1e-5


def test_copy_blocks_rejects_bad_ids():
    from rlcpm.errors import EngineError

    cache = PagedKVCache(num_layers=1, num_blocks=2, block_size=2, num_kv_heads=1, head_dim=2)
    with pytest.raises(EngineError, match=r"\[5\]"):
        cache.copy_blocks([0], [5])


def test_writing_tensors_that_carry_gradients_is_refused_with_the_fix_named(make_model, random_ids):
    model = make_model("llama")
    ids = random_ids(6)
    cache = model.new_kv_cache(num_blocks=2, block_size=4)
    meta = AttentionMetadata.paged([6], [6], [[0, 1]], 4)
    with pytest.raises(EngineError, match=r"torch.no_grad\(\) or torch.inference_mode\(\)"):
        model(ids, torch.arange(6), meta=meta, kv_cache=cache)
    with torch.no_grad():
        assert model(ids, torch.arange(6), meta=meta, kv_cache=cache).shape == (6, model.config.vocab_size)
