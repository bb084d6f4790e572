"""`BitLinear`: an nn.Linear whose forward uses the ternary weight W_q (quantization-aware training).

The latent weight stays a high-precision nn.Parameter (same name, `weight`, so checkpoints, the
optimizer, FSDP2 and weight streaming see the usual tensors); every forward recomputes the
group scales from it and multiplies by W_q, and the backward passes the gradient of W_q to the
latent weight unchanged (rlcpm.quant.ternary.ternary_ste). Activations are not quantized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rlcpm.kernels.cpu_gemm import OneDNNLinear, linear
from rlcpm.quant.ternary import check_group_size, fake_quantize, ternary_ste


class BitLinear(nn.Linear):
    """y = x W_q^T + b, W_q = ternary group-wise fake quantization of the latent W [out, in].

    Made from a OneDNNLinear (the learner's CPU linears), it multiplies on oneDNN too."""

    use_onednn: bool = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = 32,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        check_group_size(in_features, group_size, where=f"BitLinear({in_features}, {out_features})")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.group_size = group_size

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> BitLinear:
        """A BitLinear sharing `linear`'s Parameter objects (no copy; the optimizer may already hold them)."""
        check_group_size(
            linear.in_features, group_size, where=f"{type(linear).__name__}{tuple(linear.weight.shape)}"
        )
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight = linear.weight
        module.bias = linear.bias
        module.group_size = group_size
        module.use_onednn = isinstance(linear, OneDNNLinear)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        matmul = linear if self.use_onednn else F.linear
        return matmul(x, ternary_ste(self.weight, self.group_size), self.bias)

    @torch.no_grad()
    def quantized_weight(self) -> torch.Tensor:
        """W_q as the forward uses it, detached: [out, in] in the weight's dtype."""
        return fake_quantize(self.weight, self.group_size)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"
