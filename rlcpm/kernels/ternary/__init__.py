"""Ternary (BitCPM) matmul over 2-bit packed weights: Triton kernel, PyTorch reference, dispatch.

    from rlcpm.kernels.ternary import pack_ternary, ternary_matmul
    packed = pack_ternary(codes)                                # int codes [N, K] -> uint8 [N, K/4]
    y = ternary_matmul(x, packed, scales, group_size, bias)     # x [..., K] -> [..., N]

The Triton kernel lives in rlcpm.kernels.ternary.triton_matmul (imported only when used);
`ternary_matmul_op` is the rlcpm.kernels.dispatch KernelOp that picks it or the reference.
"""

from rlcpm.kernels.ternary.dispatch import ternary_matmul, ternary_matmul_op
from rlcpm.kernels.ternary.packing import CODES_PER_BYTE, pack_ternary, unpack_ternary
from rlcpm.kernels.ternary.reference import dequantize_ternary, ternary_matmul_reference

__all__ = [
    "CODES_PER_BYTE",
    "dequantize_ternary",
    "pack_ternary",
    "ternary_matmul",
    "ternary_matmul_op",
    "ternary_matmul_reference",
    "unpack_ternary",
]
