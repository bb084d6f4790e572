"""SPECS §4 invariants of the ternary quantizer and BitLinear, and parity with transformers' BitNet."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlcpm.config import QATConfig
from rlcpm.errors import RlcpmError, TrainingError
from rlcpm.quant import (
    BitLinear,
    fake_quantize,
    group_scales,
    per_tensor_fake_quantize,
    prepare_qat,
    quantize,
)
from rlcpm.quant.ternary import EPS, ternary_ste


def _weight(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_hand_computed_group():
    # one row, two groups of 4: s = mean|W_g|; c = clamp(round(W / s), -1, 1)
    weight = torch.tensor([[0.5, -1.5, 0.1, 0.0, 2.0, 2.0, -2.0, 0.4]])
    # group 1: s = 2.1 / 4 = 0.525 -> W/s = [0.95, -2.86, 0.19, 0] -> c = [1, -1, 0, 0]
    # group 2: s = 6.4 / 4 = 1.6   -> W/s = [1.25, 1.25, -1.25, 0.25] -> c = [1, 1, -1, 0]
    codes, scales = quantize(weight, group_size=4)
    torch.testing.assert_close(scales, torch.tensor([[0.525, 1.6]]))
    assert codes.tolist() == [[1, -1, 0, 0, 1, 1, -1, 0]]
    expected = torch.tensor([[0.525, -0.525, 0.0, 0.0, 1.6, 1.6, -1.6, 0.0]])
    torch.testing.assert_close(fake_quantize(weight, 4), expected)


@pytest.mark.parametrize("group_size", [8, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_weights_are_minus_s_zero_s_per_group(group_size, dtype):
    weight = _weight(16, 128).to(dtype)
    quantized = fake_quantize(weight, group_size)
    assert quantized.dtype == dtype and quantized.shape == weight.shape
    scales = group_scales(weight, group_size).to(dtype)  # [16, 128 / g]
    groups = quantized.unflatten(-1, (-1, group_size))  # [16, 128 / g, g]
    s = scales.unsqueeze(-1)
    is_ternary = (groups == s) | (groups == 0) | (groups == -s)
    assert bool(is_ternary.all())
    # the scale is the group's mean |W| (float32), and all three levels actually occur
    torch.testing.assert_close(
        group_scales(weight, group_size), weight.float().abs().unflatten(-1, (-1, group_size)).mean(-1)
    )
    assert {-1.0, 0.0, 1.0} <= set((groups / s).unique().tolist())


def test_all_zero_group_quantizes_to_zero():
    weight = torch.zeros(2, 8)
    weight[1, 4:] = 1.0
    scales = group_scales(weight, 4)
    assert torch.equal(scales[0], torch.full((2,), EPS))
    assert torch.equal(fake_quantize(weight, 4), weight)


def test_ste_gradient_equals_upstream_gradient():
    weight = _weight(8, 32).requires_grad_(True)
    upstream = _weight(8, 32, seed=1)
    ternary_ste(weight, 16).backward(upstream)
    assert torch.equal(weight.grad, upstream)


def test_bitlinear_gradient_is_the_gradient_of_w_q():
    """dL/dW of BitLinear == dL/dW_q of a plain linear layer run with W_q as its weight."""
    layer = BitLinear(32, 8, bias=True, group_size=16)
    x = _weight(5, 32, seed=2)
    target = _weight(5, 8, seed=3)
    F.mse_loss(layer(x), target).backward()
    w_q = layer.quantized_weight().requires_grad_(True)
    F.mse_loss(F.linear(x, w_q, layer.bias.detach()), target).backward()
    assert torch.equal(layer.weight.grad, w_q.grad)


def test_scales_are_recomputed_from_the_latent_weights_every_step():
    torch.manual_seed(0)
    layer = BitLinear(64, 16, bias=False, group_size=32)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = _weight(4, 64, seed=4)
    for _ in range(3):
        before = group_scales(layer.weight, 32)
        optimizer.zero_grad()
        layer(x).pow(2).sum().backward()
        optimizer.step()
        after = group_scales(layer.weight, 32)
        assert not torch.equal(before, after)  # the step moved the latent weights and their scales
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.linear(x, fake_quantize(layer.weight, 32)), rtol=0, atol=0)


def test_per_tensor_case_matches_transformers_bitnet():
    """Oracle: transformers' BitNet WeightQuant (one absmean scale per tensor, STE)."""
    bitnet = pytest.importorskip("transformers.integrations.bitnet")
    for seed, dtype in [(0, torch.float32), (1, torch.float32), (2, torch.bfloat16)]:
        weight = (_weight(48, 96, seed=seed) * 0.02).to(dtype).requires_grad_(True)
        with torch.compiler.set_stance("force_eager"):
            oracle = bitnet.WeightQuant.apply(weight)
        ours = per_tensor_fake_quantize(weight.detach())
        # same codes; values agree to rounding (the oracle divides by 1/s, we multiply by s)
        scale = weight.detach().float().abs().mean()
        assert torch.equal((oracle.float() / scale).round(), (ours.float() / scale).round())
        torch.testing.assert_close(ours, oracle.detach(), rtol=1e-6, atol=0)
        upstream = torch.randn_like(weight)
        oracle.backward(upstream)
        assert torch.equal(weight.grad, upstream)  # both are straight-through


def test_group_wise_is_the_bitnet_quantizer_applied_to_each_group():
    """Group-wise differs from BitNet only in where the absmean is taken: per group of g inputs."""
    bitnet = pytest.importorskip("transformers.integrations.bitnet")
    weight = _weight(6, 64, seed=5)
    weight[0, :32] *= 10.0  # one loud group: a per-tensor scale would zero the rest of the row
    with torch.compiler.set_stance("force_eager"):
        oracle = torch.stack(
            [bitnet.WeightQuant.apply(group) for group in weight.unflatten(-1, (-1, 32)).reshape(-1, 32)]
        ).view_as(weight)
    torch.testing.assert_close(fake_quantize(weight, 32), oracle, rtol=1e-6, atol=0)
    per_tensor = per_tensor_fake_quantize(weight)
    assert (per_tensor[1:] == 0).float().mean() > 0.5 > (fake_quantize(weight, 32)[1:] == 0).float().mean()


def test_group_size_must_divide_the_input_dimension():
    with pytest.raises(RlcpmError, match="group_size 48 does not divide the input dimension 64"):
        fake_quantize(_weight(4, 64), 48)


def test_prepare_qat_swaps_decoder_linears_only(make_model):
    model = make_model("qwen2", tie_word_embeddings=False)
    params_before = dict(model.named_parameters())
    prepare_qat(model, QATConfig(group_size=32))
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if "proj" in name or "head" in name}
    assert kinds["lm_head"] == "Linear"
    assert all(kind == "BitLinear" for name, kind in kinds.items() if name != "lm_head")
    assert len([k for k in kinds.values() if k == "BitLinear"]) == 7 * model.config.num_hidden_layers
    # same Parameter objects, same names: checkpoints, optimizers and weight streams are unchanged
    params_after = dict(model.named_parameters())
    assert params_after.keys() == params_before.keys()
    assert all(params_after[name] is params_before[name] for name in params_before)


def test_prepare_qat_names_the_layer_whose_input_dimension_does_not_fit(make_model):
    model = make_model("llama", hidden_size=64, intermediate_size=96)
    with pytest.raises(TrainingError, match=r"learner.qat.group_size for layer model.layers.0.mlp.down_proj"):
        prepare_qat(model, QATConfig(group_size=64))
