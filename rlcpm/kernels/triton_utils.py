"""Helpers shared by rlcpm's Triton kernels (imported only when a kernel runs).

Triton's CPU interpreter (TRITON_INTERPRET=1) multiplies bfloat16 tiles as raw uint16 in
`tl.dot`, so under the interpreter the kernels upcast dot operands to float32 first (`UPCAST`);
bfloat16 values are exact in float32 and the accumulation is float32 either way, so the
interpreted kernel computes what the GPU kernel computes up to summation order. float32 dots
use IEEE precision (no TF32), so float32 results match the references closely.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from rlcpm.errors import RlcpmError


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def next_pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(max(1, n)))


def check_inputs(name: str, dtypes: tuple[torch.dtype, ...], **tensors: torch.Tensor) -> None:
    """Same device, supported dtype, contiguous last dimension; errors name the tensor."""
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        raise RlcpmError(
            f"{name}: tensors on different devices: "
            + ", ".join(f"{k}={t.device}" for k, t in tensors.items())
        )
    device = devices.pop()
    if device.type != "cuda" and not interpreting():
        raise RlcpmError(f"{name}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {device}")
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.dtype not in dtypes:
            raise RlcpmError(f"{name}: {key} has dtype {tensor.dtype}; supported: {dtypes}")
        if tensor.dim() and tensor.stride(-1) != 1:
            raise RlcpmError(
                f"{name}: {key} must have a contiguous last dimension (stride {tensor.stride()})"
            )


@triton.jit
def dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with float32 accumulation (see the module docstring for UPCAST)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)
