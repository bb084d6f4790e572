"""GRPO-family objective: hand-computed examples for every option, and the SPECS §1 invariants."""

from __future__ import annotations

import math

import pytest
import torch

from rlcpm.errors import TrainingError
from rlcpm.learner.aggregation import aggregate_loss, batch_denominators
from rlcpm.learner.kl import kl_estimate
from rlcpm.learner.losses import policy_loss

# Two responses, three tokens each; old log-probs 0 so that r = exp(logprobs).
RATIOS = torch.tensor([[1.0, 1.5, 0.5], [1.0, 0.5, 4.0]])
ADVANTAGES = torch.tensor([1.0, -2.0])
# Per-token losses worked out by hand with eps_low 0.2, eps_high 0.28, c = 3:
#  A=+1: r=1 -> -1; r=1.5 -> max(-1.5, -1.28) = -1.28 (clipped high); r=0.5 -> max(-0.5, -0.8) = -0.5
#  A=-2: r=1 -> 2; r=0.5 -> max(1.0, 1.6) = 1.6 (clipped low); r=4 -> max(8, 2.56) = 8 -> dual-clip min(8, 6) = 6
PER_TOKEN = torch.tensor([[-1.0, -1.28, -0.5], [2.0, 1.6, 6.0]])


def _inputs(mask=None):
    logprobs = RATIOS.log().clone().requires_grad_(True)
    old = torch.zeros_like(logprobs)
    return logprobs, old, ADVANTAGES, torch.ones_like(RATIOS) if mask is None else mask


def test_token_mean_hand_computed():
    loss, stats = policy_loss(*_inputs())
    assert loss.item() == pytest.approx(PER_TOKEN.mean().item(), abs=1e-6)
    assert stats["clip_frac_high"].item() == pytest.approx(1 / 6)
    assert stats["clip_frac_low"].item() == pytest.approx(1 / 6)  # r=0.5 with A<0 (r=4 is not clipped)
    assert stats["dual_clip_frac"].item() == pytest.approx(1 / 6)


@pytest.mark.parametrize(
    "agg, expected",
    [
        # masking the last token of response 0: sums -2.28 (2 tokens) and 9.6 (3 tokens)
        ("token-mean", (-2.28 + 9.6) / 5),
        ("seq-mean-token-mean", (-2.28 / 2 + 9.6 / 3) / 2),
        ("seq-mean-token-sum", (-2.28 + 9.6) / 2),
    ],
)
def test_aggregations_hand_computed(agg, expected):
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss, _ = policy_loss(*_inputs(mask), agg=agg)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_dual_clip_disabled():
    loss, stats = policy_loss(*_inputs(), dual_clip=None)
    assert loss.item() == pytest.approx((-1 - 1.28 - 0.5 + 2 + 1.6 + 8) / 6, abs=1e-6)
    assert stats["dual_clip_frac"].item() == 0.0


def test_asymmetric_clip_range():
    loss, _ = policy_loss(*_inputs(), eps_low=0.1, eps_high=0.1, dual_clip=None)
    # A=+1: -1, max(-1.5,-1.1)=-1.1, max(-.5,-.9)=-.5 ; A=-2: 2, max(1, 1.8)=1.8, max(8, 2.2)=8
    assert loss.item() == pytest.approx((-1 - 1.1 - 0.5 + 2 + 1.8 + 8) / 6, abs=1e-6)


@pytest.mark.parametrize(
    "estimator, formula",
    [
        ("k1", lambda d: d),
        ("k2", lambda d: d * d / 2),
        ("k3", lambda d: math.exp(-d) + d - 1),
    ],
)
def test_kl_term_hand_computed(estimator, formula):
    logprobs, old, adv, mask = _inputs()
    ref = torch.tensor([[-0.5, 0.2, 0.0], [0.3, -1.0, 0.7]])
    d = (logprobs.detach() - ref).flatten().tolist()  # log pi_theta - log pi_ref
    kl = [formula(x) for x in d]
    loss, stats = policy_loss(logprobs, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, kl_estimator=estimator)
    expected = (PER_TOKEN.sum().item() + 0.1 * sum(kl)) / 6
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert stats["kl"].item() == pytest.approx(sum(kl) / 6, abs=1e-5)


def test_kl_coef_without_ref_logprobs_is_an_error():
    # the KL term was silently dropped
    with pytest.raises(TrainingError, match="needs ref_logprobs"):
        policy_loss(*_inputs(), kl_coef=0.1)


def test_entropy_bonus_hand_computed():
    entropy = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    loss, stats = policy_loss(*_inputs(), entropy=entropy, entropy_coef=0.01)
    assert loss.item() == pytest.approx((PER_TOKEN.sum().item() - 0.01 * 7.5) / 6, abs=1e-6)
    assert stats["entropy"].item() == pytest.approx(7.5 / 6)


def test_gspo_sequence_ratio_value_and_gradient():
    logprobs = torch.tensor([[0.1, -0.2, 0.4], [0.0, 0.05, -0.05]], requires_grad=True)
    old = torch.zeros_like(logprobs)
    adv = torch.tensor([1.0, -1.0])
    loss, stats = policy_loss(
        logprobs, old, adv, torch.ones_like(old), ratio_level="sequence", dual_clip=None
    )
    s0 = math.exp((0.1 - 0.2 + 0.4) / 3)  # 1.105 -> inside [0.8, 1.28]
    s1 = math.exp(0.0)
    assert loss.item() == pytest.approx((3 * -s0 + 3 * s1) / 6, abs=1e-6)
    loss.backward()
    # value s_i, gradient s_i * d log pi(o_t): d loss / d logprob_t = -A_i s_i / 6
    expected = torch.tensor([[-s0 / 6] * 3, [s1 / 6] * 3])
    torch.testing.assert_close(logprobs.grad, expected, atol=1e-6, rtol=0)


def test_gspo_clips_whole_sequence():
    logprobs = torch.tensor([[0.6, 0.6], [0.0, 0.0]], requires_grad=True)  # s0 = e^0.6 = 1.82 > 1.28
    loss, stats = policy_loss(
        logprobs,
        torch.zeros_like(logprobs),
        torch.tensor([1.0, 1.0]),
        torch.ones(2, 2),
        ratio_level="sequence",
    )
    assert loss.item() == pytest.approx((2 * -1.28 + 2 * -1.0) / 4, abs=1e-6)
    loss.backward()
    assert torch.all(logprobs.grad[0] == 0)  # the whole clipped sequence gets no gradient
    assert stats["clip_frac_high"].item() == pytest.approx(0.5)


def test_gspo_sequence_with_a_token_outside_the_kept_set_has_ratio_zero():
    # log pi_theta = -inf (a token outside the current top-k / top-p set) gives s_i = 0; its
    # per-token gradient carrier (-inf) - (-inf) made the loss and the ratio stats NaN.
    logprobs = torch.tensor([[-1.0, float("-inf")], [-0.5, -0.5]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]])
    loss, stats = policy_loss(
        logprobs, old, torch.tensor([-1.0, 1.0]), torch.ones(2, 2), ratio_level="sequence"
    )
    # sequence 0: r = 0 -> max(0, 1 * 0.8) = 0.8 per token; sequence 1: r = 1 -> -1 per token
    assert loss.item() == pytest.approx((2 * 0.8 - 2 * 1.0) / 4)
    assert stats["ratio_mean"].item() == pytest.approx(0.5)
    loss.backward()
    assert torch.equal(logprobs.grad[0], torch.zeros(2))


def test_loss_mask_filters_response_and_ignores_garbage():
    logprobs = torch.tensor([[-0.1, -0.2], [float("-inf"), 5.0]], requires_grad=True)
    old = torch.tensor([[-0.1, -0.2], [float("nan"), -3.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # response 1 is overlong-filtered
    loss, _ = policy_loss(
        logprobs, old, torch.tensor([0.5, 3.0]), mask, ref_logprobs=torch.zeros(2, 2), kl_coef=0.1
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.all(logprobs.grad[1] == 0)
    expected = (-0.5 * 2 + 0.1 * (kl_estimate(torch.tensor([-0.1, -0.2]), torch.zeros(2)).sum().item())) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------------- invariants


def test_first_on_policy_update_has_unit_ratio_and_no_clipping():
    torch.manual_seed(0)
    logprobs = (-torch.rand(4, 7) * 3).requires_grad_(True)
    advantages = torch.randn(4)
    loss, stats = policy_loss(logprobs, logprobs.detach().clone(), advantages, torch.ones(4, 7))
    assert stats["ratio_mean"].item() == 1.0 and stats["ratio_max"].item() == 1.0
    assert (
        stats["clip_frac_low"].item()
        == stats["clip_frac_high"].item()
        == stats["dual_clip_frac"].item()
        == 0.0
    )
    loss.backward()
    # unclipped policy gradient: d/d logprob = -A / num_tokens
    torch.testing.assert_close(logprobs.grad, (-advantages[:, None] / 28).expand(4, 7), atol=1e-7, rtol=0)


def test_dual_clip_bounds_negative_advantages():
    adv = torch.tensor([-0.7, -2.0])
    for big_log_ratio in (2.0, 10.0, 50.0):
        logprobs = torch.full((2, 1), big_log_ratio, requires_grad=True)
        loss, _ = policy_loss(logprobs, torch.zeros(2, 1), adv, torch.ones(2, 1), agg="seq-mean-token-sum")
        # per token: -A r -> infinity, bounded by -c A = 3 |A|
        assert loss.item() == pytest.approx(3 * (0.7 + 2.0) / 2, rel=1e-6)
        loss.backward()
        assert torch.all(logprobs.grad == 0)


def test_dual_clip_never_touches_nonnegative_advantages():
    torch.manual_seed(1)
    logprobs = (torch.randn(5, 6) * 3).requires_grad_(True)
    old = torch.randn(5, 6)
    adv = torch.tensor([0.0, 0.5, 2.0, 10.0, 1e-3])
    with_dual, _ = policy_loss(logprobs, old, adv, torch.ones(5, 6), dual_clip=3.0)
    (grad_with,) = torch.autograd.grad(with_dual, logprobs)
    without, _ = policy_loss(logprobs, old, adv, torch.ones(5, 6), dual_clip=None)
    (grad_without,) = torch.autograd.grad(without, logprobs)
    assert with_dual.item() == without.item()
    assert torch.equal(grad_with, grad_without)


def test_k3_is_nonnegative_and_zero_when_policies_match():
    torch.manual_seed(2)
    logprobs, ref = -torch.rand(1000) * 5, -torch.rand(1000) * 5
    assert torch.all(kl_estimate(logprobs, ref, "k3") >= 0)
    assert torch.all(kl_estimate(logprobs, logprobs.clone(), "k3") == 0)
    assert torch.all(kl_estimate(logprobs, ref, "k2") >= 0)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_a_token_outside_both_kept_sets_has_zero_kl(estimator):
    # Under rollout.top_k / top_p a sampled token can fall outside the learner's kept set; at step 0
    # pi_theta == pi_ref, so both log-probs are -inf: -inf - -inf made the KL, the loss and the
    # train/kl metric NaN.
    inf = float("-inf")
    assert kl_estimate(torch.tensor([inf, -1.0]), torch.tensor([inf, -1.0]), estimator).tolist() == [0.0, 0.0]
    logprobs = torch.tensor([[-1.0, inf]], requires_grad=True)
    ref = torch.tensor([[-1.5, inf]])
    loss, stats = policy_loss(
        logprobs, torch.tensor([[-1.0, -2.0]]), torch.tensor([1.0]), torch.ones(1, 2),
        ref_logprobs=ref, kl_coef=0.1, kl_estimator=estimator,
    )  # fmt: skip
    expected_kl = kl_estimate(torch.tensor([-1.0]), torch.tensor([-1.5]), estimator).item() / 2
    assert stats["kl"].item() == pytest.approx(expected_kl)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(logprobs.grad).all()


def test_k1_and_k3_are_unbiased_kl_estimators():
    """Sampled from pi_theta, mean k1 and k3 approach the exact KL(pi_theta || pi_ref)."""
    gen = torch.Generator().manual_seed(0)
    logits_p, logits_q = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    logp, logq = logits_p.log_softmax(0), logits_q.log_softmax(0)
    exact = (logp.exp() * (logp - logq)).sum().item()
    samples = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=gen)
    for estimator in ("k1", "k3"):
        estimate = kl_estimate(logp[samples], logq[samples], estimator).mean().item()
        assert estimate == pytest.approx(exact, abs=0.01)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_gradient_accumulation_invariance(agg):
    """One micro-batch == the sum over k micro-batches with the batch's global denominators."""
    torch.manual_seed(3)
    lengths = [5, 1, 8, 3, 7, 2]
    mask = torch.zeros(6, 8)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    mask[3] = 0  # a filtered response
    logprobs = (-torch.rand(6, 8) * 2).requires_grad_(True)
    old = logprobs.detach() + 0.3 * torch.randn(6, 8)
    adv, ref, entropy = torch.randn(6), -torch.rand(6, 8), torch.rand(6, 8)
    kwargs = dict(agg=agg, ref_logprobs=ref, kl_coef=0.05, entropy=entropy, entropy_coef=0.01)
    full, _ = policy_loss(logprobs, old, adv, mask, **kwargs)
    (grad_full,) = torch.autograd.grad(full, logprobs)

    num_tokens, num_sequences = batch_denominators(mask)
    assert (num_tokens, num_sequences) == (23, 5)
    total, grad_sum = 0.0, torch.zeros_like(logprobs)
    for rows in ([0, 1], [2], [3, 4, 5]):
        part, _ = policy_loss(
            logprobs[rows],
            old[rows],
            adv[rows],
            mask[rows],
            **{**kwargs, "ref_logprobs": ref[rows], "entropy": entropy[rows]},
            num_tokens=num_tokens,
            num_sequences=num_sequences,
        )
        (g,) = torch.autograd.grad(part, logprobs)
        total += part.item()
        grad_sum += g
    assert total == pytest.approx(full.item(), rel=1e-6)
    torch.testing.assert_close(grad_sum, grad_full, rtol=1e-6, atol=1e-9)


def test_aggregate_loss_local_denominators():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate_loss(per_token, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(per_token, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate_loss(per_token, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
