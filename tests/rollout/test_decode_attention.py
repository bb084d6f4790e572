"""The mirrored decode attention (CPU fast path) gives the dense paged backend's results; a
sequence is copied into the mirror once, when it starts decoding, and rows move only when
sequences leave."""

from __future__ import annotations

import torch

from rlcpm.rollout import Request, SamplingParams
from rlcpm.rollout.decode_attention import MirroredDecodeAttention, split_rows


def test_mirror_rows_are_loaded_once_and_moved_only_when_sequences_leave(make_engine, prompts):
    engine = make_engine("llama", max_num_seqs=4, max_num_batched_tokens=256)
    backend = engine.runner.decode_backend
    assert isinstance(backend, MirroredDecodeAttention)
    params = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    engine.generate(prompts(n=4, seed=13), params)
    # each sequence copied in once when it started decoding, then appended to in place
    assert backend.num_row_loads == 4 and backend.num_row_moves == 0
    # sequences leaving at different steps (batch rows 0, 1, 2 first): the last row moves down
    # into the freed row while it is above the batch, the others stay where they are
    lengths = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in (5, 10, 15, 20)]
    batch = prompts(n=4, seed=14)
    outs = engine.generate(batch, lengths)
    assert backend.num_row_loads == 4 + 4 and backend.num_row_moves == 2
    plain = make_engine("llama", max_num_seqs=4, max_num_batched_tokens=256, decode_mirror=False)
    for out, expected in zip(outs, plain.generate(batch, lengths)):
        assert out.token_ids == expected.token_ids
        torch.testing.assert_close(
            torch.tensor(out.logprobs), torch.tensor(expected.logprobs), rtol=0, atol=1e-5
        )


def test_mirrored_and_plain_paged_attention_agree_with_prefill_chunks_mixed_in(make_engine, prompts):
    batch = prompts(n=6, seed=15, min_len=3, max_len=60)
    params = [SamplingParams(max_new_tokens=18, temperature=1.0, seed=s, ignore_eos=True) for s in range(6)]
    outputs = {}
    for mirror in (True, False):
        # 3 at a time and 24 tokens per step: long prompts prefill in chunks next to decodes
        engine = make_engine("qwen3", max_num_seqs=3, max_num_batched_tokens=24, decode_mirror=mirror)
        assert (engine.runner.decode_backend is not None) == mirror
        outputs[mirror] = engine.generate([Request(i, p, params[i]) for i, p in enumerate(batch)])
        if mirror:  # sequences joined and left at different steps: rows were loaded and moved
            assert engine.runner.decode_backend.num_row_moves > 0
    for with_mirror, plain in zip(outputs[True], outputs[False]):
        assert with_mirror.token_ids == plain.token_ids
        torch.testing.assert_close(
            torch.tensor(with_mirror.logprobs), torch.tensor(plain.logprobs), rtol=0, atol=1e-5
        )


def test_split_rows_by_hand():
    assert split_rows([10, 10, 10]) == [(0, 3)]  # nothing padded: one call
    # long rows first, then short ones: 2 x 500 + 3 x 20 keys instead of 5 x 500
    assert split_rows([500, 490, 20, 15, 10]) == [(0, 2), (2, 5)]
    # lengths falling steadily: three ranges each save >= 10% of the 8 x 500 padded keys
    assert split_rows([500, 400, 300, 200, 100, 50, 40, 30]) == [(0, 2), (2, 4), (4, 8)]
    assert split_rows([450, 500, 480]) == [(0, 3)]  # saving < 10%
    assert split_rows([7]) == [(0, 1)]


def test_rows_of_very_different_lengths_attend_in_ranges_with_the_plain_results(make_engine, prompts):
    """Long carried-over sequences next to new short ones (chunked rollout) are split into row
    ranges, each attending over its own longest context; tokens and log-probs are unchanged."""
    long_prompts = prompts(n=3, seed=16, min_len=150, max_len=200)
    short_prompts = prompts(n=5, seed=17, min_len=3, max_len=8)
    batch = [*short_prompts, *long_prompts]  # loaded longest first whatever the batch order
    params = [SamplingParams(max_new_tokens=12, temperature=1.0, seed=s, ignore_eos=True) for s in range(8)]
    outputs = {}
    for mirror in (True, False):
        engine = make_engine("llama", max_num_seqs=8, max_num_batched_tokens=2048, decode_mirror=mirror)
        outputs[mirror] = engine.generate([Request(i, p, params[i]) for i, p in enumerate(batch)])
        if mirror:
            assert engine.runner.decode_backend.num_split_steps > 0
    for with_mirror, plain in zip(outputs[True], outputs[False]):
        assert with_mirror.token_ids == plain.token_ids
        torch.testing.assert_close(
            torch.tensor(with_mirror.logprobs), torch.tensor(plain.logprobs), rtol=0, atol=1e-5
        )


def test_the_mirror_never_takes_more_than_twice_the_paged_cache(make_engine, prompts):
    """Rows are padded to the longest context: one long sequence beside many short ones used to
    grow the mirror to rows x longest (here 16 x 256 slots beside a 640-slot cache, ~6x the KV
    budget). A batch that would not fit decodes from the paged cache instead."""
    batch = prompts(n=1, seed=18, min_len=200, max_len=200) + prompts(n=15, seed=19, min_len=3, max_len=6)
    params = [
        SamplingParams(max_new_tokens=n, temperature=1.0, seed=0, ignore_eos=True) for n in [4] + [12] * 15
    ]
    outputs = {}
    for mirror in (True, False):
        engine = make_engine(
            "llama", max_num_seqs=16, kv_budget_bytes=40 * 8192, decode_mirror=mirror
        )  # 40 blocks of 16 slots
        outputs[mirror] = engine.generate(batch, params)
        if mirror:
            backend, num_slots = engine.runner.decode_backend, engine.kv_cache.num_slots
            assert backend.mirror.shape[2] * backend.mirror.shape[4] <= 2 * num_slots  # float32 both
            assert num_slots == 640 and backend.num_row_loads == 15  # once the long one has left
    for with_mirror, plain in zip(outputs[True], outputs[False]):
        assert with_mirror.token_ids == plain.token_ids
        torch.testing.assert_close(
            torch.tensor(with_mirror.logprobs), torch.tensor(plain.logprobs), rtol=0, atol=1e-5
        )
