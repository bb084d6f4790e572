"""`TernaryLinear`: a linear layer stored as 2-bit packed codes + group scales (inference only).

Buffers (Hugging Face-style names, what a packed checkpoint holds per layer):

    weight        uint8 [out, in / 4]     packed codes (rlcpm.kernels.ternary.packing)
    weight_scale  float [out, in / g]     one scale per group of g inputs
    bias          float [out]             only when the layer has one (a Parameter, not trained)

The forward is rlcpm.kernels.ternary.ternary_matmul: the Triton kernel on CUDA, the PyTorch
reference on the CPU. The result equals F.linear(x, W_q) of the BitLinear it was made from.
"""

from __future__ import annotations

import torch
from torch import nn

from rlcpm.errors import CheckpointError
from rlcpm.kernels.ternary import CODES_PER_BYTE, dequantize_ternary, pack_ternary, ternary_matmul
from rlcpm.quant.ternary import check_group_size, quantize


class TernaryLinear(nn.Module):
    """y = x W^T + b with W = codes * scales, read from the packed buffers on every call."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        group_size: int = 32,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        check_group_size(
            in_features,
            group_size,
            where=f"TernaryLinear({in_features}, {out_features})",
            error=CheckpointError,
        )
        if in_features % CODES_PER_BYTE:
            raise CheckpointError(
                f"TernaryLinear({in_features}, {out_features}): in_features must be a multiple of "
                f"{CODES_PER_BYTE} (four 2-bit codes per byte)"
            )
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer(
            "weight",
            torch.zeros(out_features, in_features // CODES_PER_BYTE, dtype=torch.uint8, device=device),
        )
        self.register_buffer(
            "weight_scale", torch.ones(out_features, in_features // group_size, dtype=dtype, device=device)
        )
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    @classmethod
    @torch.no_grad()
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        group_size: int,
        dtype: torch.dtype | None = None,
    ) -> TernaryLinear:
        """Quantize a high-precision (latent) weight [out, in]: scales stored in `dtype` (default: weight's)."""
        dtype = dtype or weight.dtype
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, bias is not None, group_size, weight.device, dtype)
        codes, scales = quantize(weight, group_size)
        module.weight.copy_(pack_ternary(codes))
        module.weight_scale.copy_(scales.to(dtype))
        if bias is not None:
            module.bias.copy_(bias.to(dtype))
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ternary_matmul(x, self.weight, self.weight_scale, self.group_size, self.bias)

    @torch.no_grad()
    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W = codes * scales [out, in] in `dtype` (default: the scales' dtype)."""
        return dequantize_ternary(
            self.weight, self.weight_scale, self.group_size, dtype or self.weight_scale.dtype
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}"
        )
