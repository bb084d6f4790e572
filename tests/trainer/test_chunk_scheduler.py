"""Chunk scheduler bookkeeping: budgets, carry-over, version tags, group completion, state."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest

from rlcpm.trainer.chunk_scheduler import ChunkResult, ChunkScheduler, PromptStream
from rlcpm.trainer.filters import has_signal, response_loss_mask


def make(chunk_tokens, n_samples=2, max_new_tokens=10, num_examples=5):
    examples = [SimpleNamespace(id=str(i), prompt=f"p{i}") for i in range(num_examples)]
    stream = PromptStream(examples, seed=3)
    return ChunkScheduler(
        stream,
        lambda ex: [int(ex.id), 99],
        n_samples=n_samples,
        max_new_tokens=max_new_tokens,
        chunk_tokens=chunk_tokens,
        seed=7,
    )


def fake_round(sched, lengths, version, eos_at=None):
    """Each request generates min(budget, remaining target length) tokens."""
    results = []
    for req in sched.next_requests():
        target = lengths[req.traj_id]
        done = len(req.output_token_ids)
        budget = min(req.max_chunk_tokens or 10**9, req.max_new_tokens - done)
        n = min(budget, target - done)
        finished = done + n >= target
        reason = "chunk" if not finished else ("stop" if target < sched.max_new_tokens else "length")
        results.append(ChunkResult(req.traj_id, list(range(done, done + n)), [-0.5] * n, reason))
    return sched.absorb(results, version)


def test_carry_over_spans_versions_and_finishes_groups():
    sched = make(chunk_tokens=4)
    sched.top_up(2)
    lengths = {"g0.0": 3, "g0.1": 9, "g1.0": 10, "g1.1": 2}
    assert fake_round(sched, lengths, version=0) == []  # g0.1 and g1.0 carry over
    reqs = {r.traj_id: r for r in sched.next_requests()}
    assert set(reqs) == {"g0.1", "g1.0"}
    assert reqs["g0.1"].output_token_ids == [0, 1, 2, 3] and reqs["g0.1"].max_new_tokens == 10
    assert fake_round(sched, lengths, version=1) == []
    done = fake_round(sched, lengths, version=2)
    assert [g.group_id for g in done] == ["g0", "g1"]
    long = done[1].trajectories[0]
    assert long.response_token_ids == list(range(10)) and long.finish_reason == "length"
    assert long.versions == [0] * 4 + [1] * 4 + [2] * 2 and long.num_chunks == 3
    assert done[0].trajectories[0].versions == [0, 0, 0]
    assert sched.num_in_flight_groups == 0


def test_seeds_do_not_depend_on_chunking():
    a, b = make(chunk_tokens=None), make(chunk_tokens=2)
    a.top_up(3)
    b.top_up(1)
    b.top_up(2)
    seeds_a = [t.seed for g in a.in_flight.values() for t in g.trajectories]
    seeds_b = [t.seed for g in b.in_flight.values() for t in g.trajectories]
    assert seeds_a == seeds_b and len(set(seeds_a)) == 6


def test_prompt_stream_epochs_and_resume():
    stream = PromptStream([SimpleNamespace(id=i) for i in range(4)], seed=1)
    first = [stream.next().id for _ in range(8)]
    assert sorted(first[:4]) == [0, 1, 2, 3] and sorted(first[4:]) == [0, 1, 2, 3]
    again = PromptStream([SimpleNamespace(id=i) for i in range(4)], seed=1)
    again.position = 5
    assert [again.next().id for _ in range(3)] == first[5:]


def test_state_round_trip_keeps_partial_trajectories():
    sched = make(chunk_tokens=3)
    sched.top_up(2)
    lengths = {"g0.0": 5, "g0.1": 5, "g1.0": 2, "g1.1": 8}
    fake_round(sched, lengths, version=0)
    state = pickle.loads(pickle.dumps(sched.state_dict()))
    other = make(chunk_tokens=3)
    other.load_state_dict(state)
    assert [r.__dict__ for r in other.next_requests()] == [r.__dict__ for r in sched.next_requests()]
    other.top_up(1)
    sched.top_up(1)
    assert list(other.in_flight) == list(sched.in_flight)


def test_unexpected_finish_reason_is_an_error():
    sched = make(chunk_tokens=3)
    sched.top_up(1)
    with pytest.raises(ValueError, match="aborted"):
        sched.absorb([ChunkResult("g0.0", [1], [-1.0], "aborted")], version=0)


def test_dynamic_sampling_signal():
    assert not has_signal([1.0, 1.0, 1.0], binary=True)
    assert not has_signal([0.0, 0.0], binary=True)
    assert has_signal([0.0, 1.0, 1.0], binary=True)
    assert not has_signal([0.3, 0.3], binary=False)
    assert has_signal([0.3, 0.4], binary=False)


def test_overlong_and_repetition_masks():
    sched = make(chunk_tokens=None, n_samples=3)
    sched.top_up(1)
    (group,) = fake_round(sched, {"g0.0": 10, "g0.1": 4, "g0.2": 6}, version=0)
    assert response_loss_mask(group, overlong_filter=True) == [False, True, True]
    assert response_loss_mask(group, overlong_filter=False) == [True, True, True]
    assert response_loss_mask(group, overlong_filter=False, repetition=lambda ids: len(ids) == 4) == [
        True,
        False,
        True,
    ]


def test_groups_in_flight_make_one_round_enough_with_high_probability():
    from scipy.stats import binom

    from rlcpm.trainer.rl_loop import groups_in_flight_for

    for need in (1, 4, 16, 64):
        assert groups_in_flight_for(need, 1.0) == need  # synchronous, no filter: exactly N
        for rate in (0.1, 0.3, 0.6, 0.9):
            target = groups_in_flight_for(need, rate)
            assert binom.sf(need - 1, target, rate) >= 0.9  # P(at least `need` finish and pass)
        # the margin shrinks relative to the batch as it grows (a z-sigma margin, not a factor)
        assert groups_in_flight_for(need, 0.6) <= need / 0.6 * (1.25 if need >= 64 else 3.0)


def test_groups_with_dropped_samples_are_normalised_over_the_kept_ones():
    import statistics

    import torch

    from rlcpm.config import GRPOConfig
    from rlcpm.trainer.rl_loop import group_advantages
    from rlcpm.trainer.trajectory import Group

    # kept rewards [1, 0, 1, 0]; the 4 dropped samples were filled with their mean 0.5
    dropped = [False, False, True, True, False, False, True, True]
    filled = [1.0, 0.0, 0.5, 0.5, 1.0, 0.0, 0.5, 0.5]
    groups = [Group("g0", None, [], rewards=filled, dropped=dropped), Group("g1", None, [], dropped=[False] * 8)]
    rewards = torch.tensor([filled, [1.0] + [0.0] * 7])
    advantages = group_advantages(groups, rewards, GRPOConfig())
    std = statistics.stdev([1.0, 0.0, 1.0, 0.0])
    expected = [0.5 / std, -0.5 / std, 0, 0, 0.5 / std, -0.5 / std, 0, 0]
    assert advantages[0].tolist() == pytest.approx(expected, rel=1e-5)  # not +-1.32 (std over all 8)
    untouched = torch.tensor([1.0] + [0.0] * 7)
    assert advantages[1].tolist() == pytest.approx(((untouched - 0.125) / (untouched.std() + 1e-6)).tolist())


def test_rewards_equal_in_float32_have_no_signal():
    """The filter judges rewards at the precision the advantages are computed at: weighted totals
    0.1 + 0.2 and 0.3 differ in float64 only, and such a group trains on all-zero advantages."""
    import torch

    from rlcpm.config import GRPOConfig
    from rlcpm.trainer.rl_loop import group_advantages
    from rlcpm.trainer.scoring import passes_dynamic_sampling
    from rlcpm.trainer.trajectory import Group

    rewards = [0.1 + 0.2, 0.3, 0.3, 0.1 + 0.2]
    group = Group("g0", None, [], rewards=rewards, dropped=[False] * 4)
    assert group_advantages([group], torch.tensor([rewards]), GRPOConfig()).abs().max() == 0.0
    assert not passes_dynamic_sampling(group)
    group.rewards = [0.3, 0.3, 0.3, 0.31]
    assert passes_dynamic_sampling(group)


def test_resume_refuses_groups_carried_over_with_another_n_samples(tmp_path):
    """Carried-over groups keep the G they were sampled with; scoring slices results and the batch
    is [N, G] with one G for all, so a resume with another rollout.n_samples is refused by name
    (it used to be accepted, and the step mis-sliced the rewards of the mixed groups)."""
    from rlcpm.errors import CheckpointError
    from rlcpm.learner.checkpoint import STATE_FILE, checkpoint_path
    from rlcpm.trainer.rl_loop import GRPOTrainer

    saved = make(chunk_tokens=3, n_samples=4)
    saved.top_up(2)
    fake_round(saved, {f"g{g}.{i}": 5 for g in range(2) for i in range(4)}, version=0)
    loop = {"step": 2, "chunks": pickle.loads(pickle.dumps(saved.state_dict())), "buffer": [],
            "pass_rate": 1.0, "finish_rate": 1.0, "eval_before": {}, "wandb_run_id": None}  # fmt: skip
    path = checkpoint_path(tmp_path / "checkpoints", 2)
    path.mkdir(parents=True)
    (path / STATE_FILE).write_bytes(b"")

    def trainer(n_samples):
        return SimpleNamespace(
            run_dir=tmp_path,
            learner=SimpleNamespace(load_checkpoint=lambda _: {"loop": loop}),
            recipe=SimpleNamespace(rollout=SimpleNamespace(n_samples=n_samples)),
            chunks=make(chunk_tokens=3, n_samples=n_samples),
        )

    with pytest.raises(CheckpointError, match=r"rollout.n_samples 4, but the recipe has rollout.n_samples 2"):
        GRPOTrainer._restore(trainer(2))
    same = trainer(4)
    GRPOTrainer._restore(same)
    assert same.step == 2 and len(same.chunks.in_flight) == 2


def test_loss_masked_fraction_counts_responses_dropped_by_a_reward():
    """A response dropped by a reward (on_error: drop) carries no loss like a masked one: a batch
    whose every response is one or the other reads 1.0 (the "every response is masked" warning
    keys on it); it read 0.5 here, counting the mask alone."""
    from rlcpm.trainer.rl_loop import _batch_metrics

    sched = make(chunk_tokens=None, n_samples=2)
    sched.top_up(2)
    groups = fake_round(sched, {"g0.0": 10, "g0.1": 4, "g1.0": 10, "g1.1": 3}, version=0)
    for group in groups:
        group.loss_mask = response_loss_mask(group, overlong_filter=True)  # the length-10 ones
        group.dropped = [False, True]
    assert _batch_metrics(groups, version=0)["rollout/loss_masked_fraction"] == 1.0
    groups[1].dropped = [False, False]
    assert _batch_metrics(groups, version=0)["rollout/loss_masked_fraction"] == 0.75


def test_dynamic_sampling_judges_correctness_before_the_overlong_penalty():
    """SPECS §1 / DAPO: keep a group only if 0 < #correct < G. With the soft overlong penalty on,
    all-correct answers whose lengths differ within its buffer used to pass (their penalised
    rewards differ) and train on the length penalty alone; the filter judges the reward before it."""
    from rlcpm.config import GRPOConfig, RolloutConfig
    from rlcpm.rewards import RewardResult
    from rlcpm.trainer.scoring import attach_rewards, passes_dynamic_sampling

    algo = GRPOConfig(overlong_penalty={"buffer_tokens": 6, "penalty": 1.0})
    rollout = RolloutConfig(max_new_tokens=10)
    sched = make(chunk_tokens=None, n_samples=3)
    sched.top_up(1)
    (group,) = fake_round(sched, {"g0.0": 3, "g0.1": 6, "g0.2": 8}, version=0)
    attach_rewards(group, [RewardResult(1.0, {"math": 1.0})] * 3, algo, rollout)
    assert group.rewards == pytest.approx([1.0, 1 - 2 / 6, 1 - 4 / 6])  # the penalty still shapes the rewards
    assert not passes_dynamic_sampling(group)
    attach_rewards(group, [RewardResult(v, {"math": v}) for v in (1.0, 1.0, 0.0)], algo, rollout)
    assert passes_dynamic_sampling(group)


def test_reward_errors_name_the_dataset_row_of_the_failed_sample():
    """A reward's error names `sample.id`: in training and evaluation it must lead to the dataset
    row, not only to an internal trajectory id ('g0.1') or position ('eval0')."""
    from rlcpm.data import Example
    from rlcpm.rewards import CombinedReward
    from rlcpm.trainer.evaluation import evaluate
    from rlcpm.trainer.scoring import to_samples

    example = Example(
        id="tools.jsonl:42", prompt="p", fields={"tools": [{"no": "name"}], "expected_calls": []}
    )
    stream = PromptStream([example], seed=3)
    sched = ChunkScheduler(stream, lambda ex: [1], n_samples=2, max_new_tokens=10, chunk_tokens=None, seed=0)
    sched.top_up(1)
    (group,) = fake_round(sched, {"g0.0": 3, "g0.1": 3}, version=0)
    reward = CombinedReward.from_specs([{"name": "tool_use"}])
    samples = to_samples(group, lambda ids: "no call")
    assert len({s.id for s in samples}) == 2
    assert all("'tools.jsonl:42" in r.error for r in reward.score(samples))

    scored = []
    pool = SimpleNamespace(terms=reward.terms, score=lambda s: scored.extend(s) or reward.score(s))
    output = SimpleNamespace(token_ids=[5], finish_reason="stop")
    rollout = SimpleNamespace(generate_plain=lambda prompts, params: [output] * len(prompts))
    recipe = SimpleNamespace(
        eval=SimpleNamespace(num_prompts=1, temperature=0.0, greedy=False),
        rollout=SimpleNamespace(
            max_new_tokens=4, temperature=1.0, top_p=1.0, top_k=-1, stop=[], stop_token_ids=[]
        ),
        seed=0,
    )
    evaluate(recipe, rollout, pool, [example], lambda ex: [1], lambda ids: "no call")
    assert [s.id for s in scored] == ["tools.jsonl:42"]
