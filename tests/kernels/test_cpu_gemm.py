"""oneDNN float32 linears (rlcpm.kernels.cpu_gemm) against F.linear: values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rlcpm.kernels.cpu_gemm import (
    OneDNNLinear,
    linear,
    onednn_available,
    use_onednn_linears,
    uses_onednn,
)
from rlcpm.quant.bitlinear import BitLinear

pytestmark = pytest.mark.skipif(not onednn_available(), reason="PyTorch built without oneDNN")


def _grads(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    out = fn(*tensors)
    out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
    return out.detach(), [t.grad for t in tensors if t is not None]


@pytest.mark.parametrize("shape", [(37, 96), (3, 11, 96), (1, 96)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_f_linear(shape, with_bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen)
    weight = torch.randn(130, 96, generator=gen) / 10
    bias = torch.randn(130, generator=gen) if with_bias else None
    assert uses_onednn(x, weight)
    out, grads = _grads(linear, x, weight, bias)
    expected, expected_grads = _grads(F.linear, x, weight, bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert len(grads) == len(expected_grads)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_linear_takes_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(96, 40, generator=gen).t()  # [40, 96], transposed strides
    weight = torch.randn(96, 70, generator=gen).t()  # [70, 96]
    out, (grad_x, grad_w) = _grads(linear, x, weight)
    expected, (want_x, want_w) = _grads(F.linear, x, weight)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_x, want_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_w, want_w, rtol=1e-5, atol=1e-5)


def test_falls_back_where_onednn_does_not_apply():
    weight = torch.randn(8, 16)
    assert not uses_onednn(torch.randn(4, 16, dtype=torch.float64), weight.double())
    assert not uses_onednn(torch.randn(0, 16), weight)  # empty (a placeholder micro-batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not uses_onednn(torch.randn(4, 16), weight)
        assert linear(torch.randn(4, 16), weight).dtype == torch.bfloat16  # autocast's F.linear
    assert linear(torch.randn(0, 16), weight).shape == (0, 8)
    x = torch.randn(5, 16, dtype=torch.float64)
    torch.testing.assert_close(linear(x, weight.double()), F.linear(x, weight.double()))


def test_use_onednn_linears_swaps_plain_linears_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 8, bias=False))
    model.append(BitLinear(8, 8, group_size=8))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 32)
    reference = [g.clone() for g in _model_grads(model, x)]
    assert use_onednn_linears(model) == 2
    assert [type(m) for m in model] == [OneDNNLinear, nn.GELU, OneDNNLinear, BitLinear]
    assert model.state_dict().keys() == state.keys()
    for got, want in zip(_model_grads(model, x), reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bitlinear_made_from_a_onednn_linear_uses_onednn():
    torch.manual_seed(0)
    plain = nn.Linear(64, 16)
    fast = nn.Linear(64, 16)
    fast.load_state_dict(plain.state_dict())
    use_onednn_linears(fast)
    bit_plain, bit_fast = BitLinear.from_linear(plain, 32), BitLinear.from_linear(fast, 32)
    assert not bit_plain.use_onednn and bit_fast.use_onednn
    x = torch.randn(10, 64)
    out_plain, (grad_plain,) = _grads(lambda t: bit_plain(t), x)
    out_fast, (grad_fast,) = _grads(lambda t: bit_fast(t), x)
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_fast, grad_plain, rtol=1e-5, atol=1e-5)


def _model_grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    return [p.grad for p in model.parameters()]
