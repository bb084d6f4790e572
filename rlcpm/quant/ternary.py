"""BitCPM ternary weight quantization (SPECS §4): group-wise absmean scales, codes, STE.

For a weight W [N, K] (nn.Linear layout: N outputs, K inputs) and a group size g that divides K,
each row is cut into K / g groups of g consecutive input weights. Per group:

    s     = max(mean |W_g|, eps)                        scale            [N, K / g]
    c     = clamp(round(W_g / s), -1, 1)                code in {-1, 0, 1}   [N, K]
    W_q   = c * s                                       forward weight   [N, K]

Scales and codes are computed in float32 from the (latent, high-precision) weights on every
call, so they follow the weights as they train. `ternary_ste` returns W_q in the forward and
passes the upstream gradient to W unchanged in the backward (straight-through estimator,
out = W + stopgrad(W_q - W)); it is written as an autograd Function so the forward value is
W_q exactly (W + (W_q - W) is not, in floating point).

`round` is round-half-to-even (torch.round), as in transformers' BitNet `WeightQuant`; with a
single group spanning the whole tensor (`per_tensor_fake_quantize`) this is that quantizer.
"""

from __future__ import annotations

import torch

from rlcpm.errors import RlcpmError

EPS = 1e-5  # the scale floor: an all-zero group quantizes to zeros, not NaN (transformers uses 1e-5)


def check_group_size(
    in_features: int, group_size: int, where: str = "weight", error: type[RlcpmError] = RlcpmError
) -> None:
    """Raise `error` unless `group_size` > 0 divides `in_features` (the K of a [N, K] weight)."""
    if group_size <= 0 or in_features % group_size:
        divisors = [g for g in (16, 32, 64, 128, 256) if in_features % g == 0]
        raise error(
            f"{where}: group_size {group_size} does not divide the input dimension {in_features}; "
            f"choose one that does (e.g. {divisors or [in_features]})"
        )


def group_scales(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """s = max(mean |W_g|, eps) per group: weight [N, K] -> scales float32 [N, K / g]."""
    check_group_size(weight.shape[-1], group_size)
    groups = weight.detach().float().unflatten(-1, (-1, group_size))  # [N, K/g, g]
    return groups.abs().mean(dim=-1).clamp(min=EPS)


def ternary_codes(weight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """c = clamp(round(W / s), -1, 1): weight [N, K], scales [N, K / g] -> int8 codes [N, K]."""
    per_weight = scales.float().repeat_interleave(group_size, dim=-1)  # [N, K]
    return (weight.detach().float() / per_weight).round().clamp(-1, 1).to(torch.int8)


def quantize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [N, K], scales float32 [N, K / g]) of a weight [N, K]."""
    scales = group_scales(weight, group_size)
    return ternary_codes(weight, scales, group_size), scales


def fake_quantize(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """W_q (no gradient): weight [N, K] -> [N, K] in the weight's dtype, values in {-s, 0, s} per group."""
    codes, scales = quantize(weight, group_size)
    return (codes.float() * scales.repeat_interleave(group_size, dim=-1)).to(weight.dtype)


def per_tensor_fake_quantize(weight: torch.Tensor) -> torch.Tensor:
    """W_q with one scale for the whole tensor (BitNet b1.58's granularity), same dtype and shape."""
    return fake_quantize(weight.reshape(1, -1), weight.numel()).view_as(weight)


class _TernarySTE(torch.autograd.Function):
    """forward: W -> W_q; backward: dL/dW = dL/dW_q (straight through)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, group_size: int) -> torch.Tensor:
        return fake_quantize(weight, group_size)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output, None


def ternary_ste(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """W_q in the forward, identity gradient in the backward (weight [N, K] -> [N, K])."""
    return _TernarySTE.apply(weight, group_size)
