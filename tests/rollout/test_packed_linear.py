"""PackedLinear (oneDNN-prepacked CPU weights) computes what nn.Linear computes, follows in-place
weight changes, and leaves training (grad mode) on the plain path."""

from __future__ import annotations

import pytest
import torch

from rlcpm.models import load_model
from rlcpm.rollout import SamplingParams, sampling_logprobs
from rlcpm.rollout.packed_linear import PackedLinear, is_packing_available, pack_linear_layers

pytestmark = pytest.mark.skipif(not is_packing_available(), reason="oneDNN packing unavailable")


def test_packed_linear_equals_linear_and_repacks_after_in_place_updates():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 96), torch.nn.Linear(96, 32, bias=False), torch.nn.Linear(4, 4)
    )
    assert len(pack_linear_layers(model, min_weight_numel=100)) == 2  # the 4x4 layer stays plain
    assert type(model[2]) is torch.nn.Linear and isinstance(model[0], PackedLinear)
    assert [n for n, _ in model.named_parameters()] == [
        "0.weight",
        "0.bias",
        "1.weight",
        "2.weight",
        "2.bias",
    ]
    x = torch.randn(5, 3, 64)
    with torch.inference_mode():
        got = model[1](model[0](x))
    expected = torch.nn.functional.linear(
        torch.nn.functional.linear(x, model[0].weight, model[0].bias), model[1].weight
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        model[1].weight.mul_(-2.0)  # e.g. update_weights or an optimizer step on a shared model
    with torch.inference_mode():
        torch.testing.assert_close(model[1](model[0](x)), -2 * expected, rtol=1e-5, atol=1e-5)
    out = model[1](model[0](x)).sum()  # grad mode: plain F.linear, gradients flow
    out.backward()
    assert model[0].weight.grad is not None


def test_engine_with_every_linear_packed_matches_transformers_and_the_learner(
    make_engine, hf_greedy, prompts, tiny_dirs
):
    engine = make_engine("qwen2", max_num_seqs=4)
    assert len(pack_linear_layers(engine.model, min_weight_numel=0)) == 2 * 7 + 1
    batch = prompts(n=4, seed=12)
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    for prompt, out in zip(batch, engine.generate(batch, params)):
        assert out.token_ids == hf_greedy("qwen2", prompt, 10)
    sampled = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=40, seed=3, ignore_eos=True)
    learner_model = load_model(str(tiny_dirs["qwen2"]))
    for prompt, out in zip(batch, engine.generate(batch, sampled)):
        with torch.no_grad():
            logits = learner_model(torch.tensor([prompt + out.token_ids]))[0, len(prompt) - 1 : -1]
        expected = sampling_logprobs(logits, torch.tensor(out.token_ids), 0.9, 40)
        torch.testing.assert_close(torch.tensor(out.logprobs), expected, rtol=0, atol=1e-5)
