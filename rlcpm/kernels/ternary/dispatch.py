"""`ternary_matmul`: the one place that checks the operands and picks the kernel or the reference.

backend "auto"       Triton on CUDA tensors (when triton imports), else the PyTorch reference
backend "triton"     the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1 for tests)
backend "reference"  the PyTorch reference
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch

from rlcpm.errors import EngineError
from rlcpm.kernels.ternary.packing import CODES_PER_BYTE
from rlcpm.kernels.ternary.reference import ternary_matmul_reference

Backend = Literal["auto", "triton", "reference"]


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(device: torch.device, backend: Backend = "auto") -> str:
    """ "triton" or "reference" for tensors on `device`."""
    if backend not in ("auto", "triton", "reference"):
        raise EngineError(f"ternary matmul backend {backend!r} is not one of auto, triton, reference")
    if backend != "auto":
        return backend
    is_interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return "triton" if triton_available() and (device.type == "cuda" and not is_interpreted) else "reference"


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
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """y = x W^T + b, W = unpack(packed) * s per group: x [..., K] -> y [..., N] in x's dtype.

    packed: uint8 [N, K / 4] (rlcpm.kernels.ternary.packing); scales: [N, K / group_size].
    """
    check_operands(x, packed, scales, group_size, bias)
    leading = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if select_backend(x.device, backend) == "triton":
        from rlcpm.kernels.ternary.triton_matmul import ternary_matmul_triton

        out = ternary_matmul_triton(x2d, packed, scales, group_size, bias)
    else:
        out = ternary_matmul_reference(x2d, packed, scales, group_size, bias)
    return out.view(*leading, packed.shape[0])
