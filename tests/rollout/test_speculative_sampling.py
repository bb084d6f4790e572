"""Speculative sampling keeps the target's distribution exactly (chi-square tests).

The acceptance rule alone (many rows, fixed p and q), and the engine end to end on a
16-token model: the first generated token and the first two tokens jointly follow the
target's sampling distribution, with a draft head over a subset (q = 0 outside it) and with
temperature / top-k / top-p filters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from rlcpm.models.tiny import build_tiny_model, tiny_config
from rlcpm.rollout import Engine, SamplingParams
from rlcpm.rollout.draft_head import DraftHead
from rlcpm.rollout.sampling import sampling_log_distribution
from rlcpm.rollout.speculative import Drafter, accept_drafts

VOCAB = 16
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


def _chi_square_pvalue(observed: np.ndarray, expected_probs: np.ndarray) -> float:
    """Pearson chi-square; cells expected below 5 are pooled into one."""
    observed = observed.astype(np.float64)
    expected = expected_probs.astype(np.float64) / expected_probs.sum() * observed.sum()
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    exp *= obs.sum() / exp.sum()  # exact totals (float rounding)
    return stats.chisquare(obs, exp).pvalue


def test_acceptance_rule_reproduces_p_with_a_subset_draft():
    """Rows share p_1, p_2 (target) and q_1 (draft over 5 of 8 ids); the first emitted token
    must follow p_1, and when x_1 is accepted the second must follow p_2 (k = 1: the bonus)."""
    generator = torch.Generator().manual_seed(0)
    num_rows, vocab = 40_000, 8
    subset = torch.tensor([0, 2, 3, 5, 7])
    p = torch.softmax(torch.randn(2, vocab, generator=generator) * 1.5, -1)  # [K+1, V]
    q = torch.softmax(torch.randn(1, subset.numel(), generator=generator) * 1.5, -1)  # [K, Vs]
    draft_rows = torch.multinomial(q[0], num_rows, replacement=True, generator=generator)[:, None]
    num_accepted, next_token = accept_drafts(
        p.log().expand(num_rows, 2, vocab),
        p.argmax(-1).expand(num_rows, 2),
        subset[draft_rows],
        draft_rows,
        q.expand(num_rows, 1, subset.numel()),
        subset,
        torch.ones(num_rows, dtype=torch.long),
        torch.zeros(num_rows, dtype=torch.bool),
        torch.rand(num_rows, 1, generator=generator, dtype=torch.float64),
        torch.rand(num_rows, 2, generator=generator, dtype=torch.float64),
    )
    first = torch.where(num_accepted == 1, subset[draft_rows[:, 0]], next_token)
    assert _chi_square_pvalue(np.bincount(first.numpy(), minlength=vocab), p[0].numpy()) > 1e-3
    second = next_token[num_accepted == 1]
    assert _chi_square_pvalue(np.bincount(second.numpy(), minlength=vocab), p[1].numpy()) > 1e-3
    # acceptance probability of the rule: sum_x min(p(x), q(x)) over the subset
    expected_rate = torch.minimum(p[0, subset], q[0]).sum().item()
    rate = num_accepted.double().mean().item()
    assert abs(rate - expected_rate) < 4 * (expected_rate * (1 - expected_rate) / num_rows) ** 0.5
    # ids outside the subset can only come from the residual, never from a draft
    assert set(first[num_accepted == 1].tolist()) <= set(subset.tolist())


def test_greedy_acceptance_takes_the_longest_matching_prefix():
    target_argmax = torch.tensor([[4, 7, 1, 3], [4, 7, 1, 3], [4, 7, 1, 3]])
    draft_ids = torch.tensor([[4, 7, 2], [5, 7, 1], [4, 7, 1]])
    num_accepted, next_token = accept_drafts(
        torch.zeros(3, 4, 8).log_softmax(-1),
        target_argmax,
        draft_ids,
        draft_ids,
        torch.full((3, 3, 8), 1 / 8),
        torch.arange(8),
        torch.tensor([3, 3, 2]),
        torch.ones(3, dtype=torch.bool),
        torch.zeros(3, 3, dtype=torch.float64),
        torch.zeros(3, 4, dtype=torch.float64),
    )
    assert num_accepted.tolist() == [2, 0, 2]  # row 3 drafted only 2 (its third is padding)
    assert next_token.tolist() == [1, 4, 1]


@pytest.fixture(scope="module")
def small_vocab_models():
    """A 16-token target and an unrelated 16-token draft (their distributions differ a lot)."""
    config = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, max_position_embeddings=64)
    target = build_tiny_model(tiny_config("llama", **config), seed=0, init_std=0.3)
    draft = build_tiny_model(tiny_config("llama", num_hidden_layers=1, **config), seed=1, init_std=0.3)
    return target, draft


@pytest.mark.parametrize(
    "num_draft_tokens, subset, params",
    [
        (1, [0, 2, 3, 6, 7, 9, 11, 14], SamplingParams(max_new_tokens=2, temperature=1.0)),
        (3, None, SamplingParams(max_new_tokens=3, temperature=0.8, top_k=9, top_p=0.9)),
    ],
    ids=["k1-subset-T1", "k2-full-filtered"],
)
def test_engine_samples_follow_the_target_distribution(small_vocab_models, num_draft_tokens, subset, params):
    target, draft = small_vocab_models
    num_samples = 3000
    engine = Engine(
        target,
        None,
        eos_token_ids=[],
        drafter=Drafter(draft, DraftHead(draft.lm_head.weight, subset), num_draft_tokens),
        max_num_seqs=512,
        max_num_batched_tokens=4096,
        kv_budget_bytes=8 * 1024**2,
        block_size=4,
    )
    requests = [
        SamplingParams(**{**params.__dict__, "seed": seed, "ignore_eos": True}) for seed in range(num_samples)
    ]
    outs = engine.generate([PROMPT] * num_samples, requests)
    tokens = np.array([o.token_ids[:2] for o in outs])  # [S, 2]
    stats_ = engine.engine_stats()
    assert 0.1 < stats_["spec_acceptance_rate"] < 0.9  # both accept and reject paths ran

    def log_dist(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = target(ids)[:, -1]
        return sampling_log_distribution(logits, params.temperature, params.top_k, params.top_p).double()

    p_first = log_dist(torch.tensor([PROMPT])).exp()[0]  # [V]
    p_second = log_dist(torch.tensor([PROMPT + [a] for a in range(VOCAB)])).exp()  # [V, V] given a
    joint = (p_first[:, None] * p_second).flatten().numpy()
    first_counts = np.bincount(tokens[:, 0], minlength=VOCAB)
    pair_counts = np.bincount(tokens[:, 0] * VOCAB + tokens[:, 1], minlength=VOCAB * VOCAB)
    assert first_counts[p_first.numpy() == 0].sum() == 0  # nothing outside top-k / top-p
    assert _chi_square_pvalue(first_counts, p_first.numpy()) > 1e-3
    assert _chi_square_pvalue(pair_counts, joint) > 1e-3
