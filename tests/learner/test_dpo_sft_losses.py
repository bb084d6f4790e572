"""DPO family and SFT losses on hand-computed numbers (TRL parity is in test_dpo_parity.py)."""

from __future__ import annotations

import math

import pytest
import torch

from rlcpm.learner.dpo import dpo_loss
from rlcpm.learner.sft import sft_loss

CHOSEN, REJECTED = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
REF_CHOSEN, REF_REJECTED = torch.tensor([-11.0, -4.5]), torch.tensor([-11.0, -3.5])
# h = (c - rc) - (r - rr): pair 0: 1 - (-1) = 2 ; pair 1: 0.5 - 0.5 = 0


def _logsigmoid(x):
    return -math.log1p(math.exp(-x))


def test_sigmoid_dpo():
    loss, stats = dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5)
    assert loss.item() == pytest.approx(-(_logsigmoid(1.0) + _logsigmoid(0.0)) / 2, rel=1e-6)
    assert stats["rewards_chosen"].item() == pytest.approx((0.5 * 1 + 0.5 * 0.5) / 2)
    assert stats["accuracy"].item() == 0.5


def test_cdpo_label_smoothing():
    eps = 0.2
    loss, _ = dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5, label_smoothing=eps)
    per_pair = [-(1 - eps) * _logsigmoid(z) - eps * _logsigmoid(-z) for z in (1.0, 0.0)]
    assert loss.item() == pytest.approx(sum(per_pair) / 2, rel=1e-6)


def test_hinge():
    loss, _ = dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.25, loss_type="hinge")
    assert loss.item() == pytest.approx((max(0, 1 - 0.5) + 1.0) / 2)


def test_ipo_is_length_normalised():
    lengths_c, lengths_r = torch.tensor([2.0, 5.0]), torch.tensor([4.0, 1.0])
    loss, _ = dpo_loss(
        CHOSEN,
        REJECTED,
        REF_CHOSEN,
        REF_REJECTED,
        beta=0.1,
        loss_type="ipo",
        chosen_lengths=lengths_c,
        rejected_lengths=lengths_r,
    )
    h0 = 1 / 2 - (-1) / 4
    h1 = 0.5 / 5 - 0.5 / 1
    assert loss.item() == pytest.approx(((h0 - 5) ** 2 + (h1 - 5) ** 2) / 2, rel=1e-6)


def test_dpo_gradient_sign_and_reference_detached():
    chosen = CHOSEN.clone().requires_grad_(True)
    ref = REF_CHOSEN.clone().requires_grad_(True)
    loss, _ = dpo_loss(chosen, REJECTED, ref, REF_REJECTED, beta=0.5)
    loss.backward()
    assert torch.all(chosen.grad < 0)  # raising the chosen log-prob lowers the loss
    assert ref.grad is None


def test_dpo_micro_batches_sum_to_batch_loss():
    full, _ = dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.3)
    parts = [
        dpo_loss(
            CHOSEN[i : i + 1],
            REJECTED[i : i + 1],
            REF_CHOSEN[i : i + 1],
            REF_REJECTED[i : i + 1],
            beta=0.3,
            num_pairs=2,
        )[0]
        for i in range(2)
    ]
    assert sum(p.item() for p in parts) == pytest.approx(full.item(), rel=1e-7)


def test_sft_nll_on_response_tokens_only():
    logprobs = torch.tensor([[-0.5, -1.0, float("-inf")], [-2.0, -0.1, -0.3]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])  # prompt / padding positions masked
    loss, stats = sft_loss(logprobs, mask)
    assert loss.item() == pytest.approx((0.5 + 1.0 + 0.1 + 0.3) / 4)
    assert stats["num_tokens"].item() == 4
    part0, _ = sft_loss(logprobs[:1], mask[:1], num_tokens=4)
    part1, _ = sft_loss(logprobs[1:], mask[1:], num_tokens=4)
    assert (part0 + part1).item() == pytest.approx(loss.item())
