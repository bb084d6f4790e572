"""Pure-PyTorch ternary matmul: unpack the 2-bit codes, scale them, one dense matmul.

The reference of the Triton kernel (same signature, same result up to summation order) and the
CPU path of `TernaryLinear`. It materialises the dequantized weight for each call, so it saves
memory at rest, not bandwidth; the Triton kernel dequantizes tiles in registers instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlcpm.kernels.ternary.packing import unpack_ternary


def dequantize_ternary(
    packed: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """W = c * s in `dtype`: packed uint8 [N, K / 4], scales [N, K / g] -> [N, K].

    Exact in any float dtype: c is -1, 0 or 1, so c * s only sets the sign of s (rounded to dtype).
    """
    codes = unpack_ternary(packed).to(dtype)  # [N, K]
    num_out, in_features = codes.shape
    grouped = codes.view(num_out, in_features // group_size, group_size) * scales.to(dtype).unsqueeze(-1)
    return grouped.view(num_out, in_features)


def ternary_matmul_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T + b with W = unpack(packed) * s: x [M, K] -> y [M, N] in x's dtype."""
    weight = dequantize_ternary(packed, scales, group_size, x.dtype)  # [N, K]
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
