"""Chunked target log-probs / entropy == the naive float32 log-softmax, values and gradients."""

from __future__ import annotations

import pytest
import torch

from rlcpm.learner.logprobs import naive_target_logprobs, target_logprobs
from rlcpm.rollout.sampling import sampling_logprobs

CASES = [
    # temperature, top_k, top_p
    (1.0, -1, 1.0),
    (0.7, -1, 1.0),
    (1.0, 8, 1.0),
    (1.0, -1, 0.9),
    (1.2, 12, 0.85),
    (0.0, -1, 1.0),  # greedy: plain log_softmax
]


@pytest.mark.parametrize("onednn", [False, True])
@pytest.mark.parametrize("temperature, top_k, top_p", CASES)
def test_chunked_equals_naive(temperature, top_k, top_p, onednn):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(45, 16, generator=gen, requires_grad=True)
    weight = (torch.randn(97, 16, generator=gen) * 0.5).requires_grad_(True)
    targets = torch.randint(0, 97, (45,), generator=gen)
    with torch.no_grad():  # make sure some targets are inside every filter: use the argmax for half of them
        targets[::2] = (hidden[::2] @ weight.t()).argmax(-1)
    lp, ent = target_logprobs(
        hidden, weight, targets, temperature=temperature, top_k=top_k, top_p=top_p, chunk_tokens=7,
        onednn=onednn,
    )  # fmt: skip
    ref_lp, ref_ent = naive_target_logprobs(
        hidden, weight, targets, temperature=temperature, top_k=top_k, top_p=top_p
    )
    torch.testing.assert_close(lp, ref_lp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-6)
    # the shared engine definition, token by token
    logits = hidden.detach() @ weight.detach().t()
    torch.testing.assert_close(lp.detach(), sampling_logprobs(logits, targets, temperature, top_k, top_p))

    kept = torch.isfinite(ref_lp)
    g_lp, g_ent = torch.randn(45, generator=gen), torch.randn(45, generator=gen)
    objective = lambda a, b: (torch.where(kept, a, 0.0) * g_lp).sum() + (b * g_ent).sum()
    grads = torch.autograd.grad(objective(lp, ent), (hidden, weight))
    ref_grads = torch.autograd.grad(objective(ref_lp, ref_ent), (hidden, weight))
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5)


def test_gradient_of_logprobs_alone_and_filtered_targets():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(20, 8, generator=gen, requires_grad=True)
    weight = torch.randn(30, 8, generator=gen, requires_grad=True)
    targets = torch.randint(0, 30, (20,), generator=gen)
    lp, _ = target_logprobs(hidden, weight, targets, top_k=3, chunk_tokens=6)
    assert torch.isinf(lp).any() and torch.isfinite(lp).any()  # some targets fall outside the top 3
    kept = torch.isfinite(lp)
    (torch.where(kept, lp, 0.0).sum()).backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    grad_h = hidden.grad.clone()
    hidden.grad = None
    ref_lp, _ = naive_target_logprobs(hidden, weight, targets, top_k=3)
    torch.where(kept, ref_lp, 0.0).sum().backward()
    torch.testing.assert_close(grad_h, hidden.grad, rtol=1e-5, atol=1e-6)


def test_bfloat16_hidden_matches_model_dtype_head():
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(10, 16, generator=gen).bfloat16().requires_grad_(True)
    weight = torch.randn(40, 16, generator=gen).bfloat16().requires_grad_(True)
    targets = torch.randint(0, 40, (10,), generator=gen)
    lp, _ = target_logprobs(hidden, weight, targets, chunk_tokens=3)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, sampling_logprobs(hidden.detach() @ weight.detach().t(), targets))
    lp.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
