"""Packed micro-batches: layout, token budget, rank sharding."""

from __future__ import annotations

import torch

from rlcpm.learner.packing import (
    pack_micro_batch,
    plan_micro_batches,
    shard_across_ranks,
    split_by_token_budget,
)


def test_pack_layout():
    prompts = [[1, 2, 3], [4], [5, 6]]
    responses = [[7, 8], [9, 10, 11], [12]]
    mb = pack_micro_batch(prompts, responses, [0, 1, 2])
    # sequences enter without their last token: [1,2,3,7] [4,9,10] [5,6]
    assert mb.input_ids.tolist() == [1, 2, 3, 7, 4, 9, 10, 5, 6]
    assert mb.positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1]
    assert mb.seq_lens == [4, 3, 2]
    # the token at score_index predicts the target: 3 -> 7, 7 -> 8, 4 -> 9, ...
    assert mb.score_index.tolist() == [2, 3, 4, 5, 6, 8]
    assert mb.targets.tolist() == [7, 8, 9, 10, 11, 12]
    padded = mb.to_padded(mb.targets.float(), fill=-1)
    assert padded.tolist() == [[7, 8, -1], [9, 10, 11], [12, -1, -1]]
    assert mb.response_mask().sum().item() == 6
    assert (
        mb.gather([[0.1, 0.2], [0.3, 0.4, 0.5], [0.6]]).tolist()
        == torch.tensor([[0.1, 0.2, 0.0], [0.3, 0.4, 0.5], [0.6, 0.0, 0.0]]).tolist()
    )


def test_shared_prompt_layout():
    prompts = [[1, 2, 3], [1, 2, 3], [1, 2, 3], [4, 5]]
    responses = [[7, 8], [9], [10, 11, 12], [13, 14]]
    mb = pack_micro_batch(prompts, responses, [0, 1, 2, 3], share_prompts=True)
    # the prompt once, then each response[:-1] continuing it ([9][:-1] is empty: no segment);
    # the last sequence has its own prompt: an ordinary sequence
    assert mb.input_ids.tolist() == [1, 2, 3, 7, 10, 11, 4, 5, 13]
    assert mb.positions.tolist() == [0, 1, 2, 3, 3, 4, 0, 1, 2]
    assert mb.seq_lens == [3, 1, 2, 3]
    assert mb.segment_prefix == [-1, 0, 0, -1]
    # every response's first token is predicted by the prompt's last row (index 2)
    assert mb.score_index.tolist() == [2, 3, 2, 2, 4, 5, 7, 8]
    assert mb.targets.tolist() == [7, 8, 9, 10, 11, 12, 13, 14]
    assert mb.num_sequences == 4
    assert mb.to_padded(mb.targets.float(), fill=-1).tolist() == [
        [7, 8, -1],
        [9, -1, -1],
        [10, 11, 12],
        [13, 14, -1],
    ]
    unshared = pack_micro_batch(prompts, responses, [0, 1, 2, 3])
    assert unshared.segment_prefix is None and unshared.num_tokens == 4 + 3 + 5 + 3


def test_token_budget_split():
    assert split_by_token_budget([3, 3, 3, 10, 1, 0, 2], budget=6) == [[0, 1], [2], [3], [4, 6]]
    mbs = plan_micro_batches([[1] * 5] * 4, [[2] * 3] * 4, budget=16)
    assert [mb.num_tokens for mb in mbs] == [14, 14]
    assert [mb.sequence_ids for mb in mbs] == [[0, 1], [2, 3]]


def test_units_stay_together_and_ranks_partition_the_batch():
    prompts = [[1, 2]] * 6
    responses = [[3] * n for n in (4, 2, 6, 1, 3, 5)]
    units = [[0, 1], [2, 3], [4, 5]]  # e.g. DPO (chosen, rejected) pairs
    per_rank = [
        plan_micro_batches(prompts, responses, 9, units=units, rank=r, world_size=2) for r in range(2)
    ]
    seen = [mb.sequence_ids for mbs in per_rank for mb in mbs]
    assert sorted(i for ids in seen for i in ids) == list(range(6))
    for ids in seen:
        for unit in units:
            assert set(unit) <= set(ids) or not set(unit) & set(ids)


def test_shard_across_ranks_balances_tokens():
    lengths = [10, 1, 7, 3, 3, 8]
    shards = shard_across_ranks(lengths, 2)
    assert sorted(i for s in shards for i in s) == list(range(6))
    loads = [sum(lengths[i] for i in s) for s in shards]
    assert max(loads) - min(loads) <= 2


def test_rl_batch_from_the_rl_loops_groups():
    from rlcpm.learner import RLBatch
    from rlcpm.trainer.trajectory import Group, Trajectory

    def trajectory(i, n):
        t = Trajectory(f"t{i}", "g", [1, 2], seed=i)
        t.extend(list(range(3, 3 + n)), [-0.5] * n, version=4)
        t.finish_reason = "stop"
        return t

    group = Group("g", example=None, trajectories=[trajectory(i, n) for i, n in enumerate((2, 5, 3))])
    group.rewards, group.loss_mask, group.dropped = [1.0, 0.0, 1.0], [True, False, True], [False, False, True]
    batch = RLBatch.from_groups([group], [[0.5, -1.0, 0.5]])
    assert [s.advantage for s in batch.sequences] == [0.5, -1.0, 0.5]
    assert [s.is_loss_masked for s in batch.sequences] == [
        False,
        True,
        True,
    ]  # filtered; dropped by the reward pool
    assert batch.sequences[1].versions == [4] * 5 and batch.sequences[1].behaviour_logprobs == [-0.5] * 5
    assert (batch.num_loss_tokens, batch.num_loss_sequences) == (2, 1)
