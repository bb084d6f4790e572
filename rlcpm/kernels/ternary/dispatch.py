"""`ternary_matmul`: checks the operands, then the shared KernelOp picks the kernel or the reference.

The choice is rlcpm.kernels.dispatch's (one place for every kernel): the Triton kernel on CUDA
tensors when Triton imports, the PyTorch reference otherwise; RLCPM_KERNELS=reference|triton
forces one. `ternary_matmul_op.reference` / `.kernel` call one explicitly.
"""

from __future__ import annotations

import torch

from rlcpm.errors import EngineError
from rlcpm.kernels.dispatch import KernelOp
from rlcpm.kernels.ternary.packing import CODES_PER_BYTE
from rlcpm.kernels.ternary.reference import ternary_matmul_reference

ternary_matmul_op = KernelOp(
    "ternary.matmul", ternary_matmul_reference, "rlcpm.kernels.ternary.triton_matmul:ternary_matmul_triton"
)


def check_operands(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int, bias: torch.Tensor | None
) -> None:
    """Raise EngineError naming the operand whose shape, dtype or device does not fit."""
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise EngineError(
            f"packed ternary weight must be uint8 [N, K/4], got {packed.dtype} {tuple(packed.shape)}"
        )
    num_out, in_features = packed.shape[0], packed.shape[1] * CODES_PER_BYTE
    if x.shape[-1] != in_features:
        raise EngineError(
            f"x has {x.shape[-1]} input features, the packed weight {tuple(packed.shape)} holds {in_features} "
            f"({CODES_PER_BYTE} codes per byte)"
        )
    if group_size <= 0 or in_features % group_size:
        raise EngineError(f"group_size {group_size} does not divide the input dimension {in_features}")
    if tuple(scales.shape) != (num_out, in_features // group_size):
        raise EngineError(
            f"scales have shape {tuple(scales.shape)}, expected {(num_out, in_features // group_size)} "
            f"(one per group of {group_size} inputs of each of {num_out} outputs)"
        )
    if not x.is_floating_point() or not scales.is_floating_point():
        raise EngineError(f"x and scales must be floating point, got {x.dtype} and {scales.dtype}")
    if bias is not None and tuple(bias.shape) != (num_out,):
        raise EngineError(f"bias has shape {tuple(bias.shape)}, expected ({num_out},)")
    devices = {t.device for t in (x, packed, scales, bias) if t is not None}
    if len(devices) > 1:
        raise EngineError(f"ternary matmul operands are on different devices: {sorted(map(str, devices))}")


def ternary_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T + b, W = unpack(packed) * s per group: x [..., K] -> y [..., N] in x's dtype.

    packed: uint8 [N, K / 4] (rlcpm.kernels.ternary.packing); scales: [N, K / group_size].
    """
    check_operands(x, packed, scales, group_size, bias)
    out = ternary_matmul_op(x.reshape(-1, x.shape[-1]), packed, scales, group_size, bias)
    return out.view(*x.shape[:-1], packed.shape[0])
