"""The packed ternary format read by the ternary matmul: 2-bit codes, four per byte.

A ternary weight [N, K] (codes c in {-1, 0, 1}, nn.Linear layout) is stored as uint8 [N, K / 4].
The input dimension is cut into four quarters of Q = K / 4 columns; byte j of row n holds the
codes of columns j, Q + j, 2Q + j and 3Q + j, each as c + 1 in {0, 1, 2}, at bits 0-1, 2-3,
4-5 and 6-7:

    packed[n, j] = sum_i (c[n, i * Q + j] + 1) << (2 * i)        i = 0..3

Unpacking bit pair i of a contiguous run of bytes gives a contiguous run of columns of quarter
i, so a kernel reads one packed tile and feeds four dense dot products without gathers.
The bit pattern 3 never occurs; it is rejected on unpacking (a corrupt or foreign checkpoint).
"""

from __future__ import annotations

import torch

from rlcpm.errors import CheckpointError

CODES_PER_BYTE = 4


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """int codes in {-1, 0, 1} [N, K] (K divisible by 4) -> uint8 [N, K / 4]."""
    num_rows, in_features = codes.shape
    if in_features % CODES_PER_BYTE:
        raise CheckpointError(
            f"cannot pack ternary codes of shape {tuple(codes.shape)}: the input dimension {in_features} "
            f"must be a multiple of {CODES_PER_BYTE} (four 2-bit codes per byte)"
        )
    if codes.numel() and (codes.min() < -1 or codes.max() > 1):
        raise CheckpointError(
            f"ternary codes must be -1, 0 or 1, got values in [{codes.min()}, {codes.max()}]"
        )
    quarters = (codes.to(torch.int32) + 1).view(num_rows, CODES_PER_BYTE, in_features // CODES_PER_BYTE)
    shifts = torch.arange(0, 2 * CODES_PER_BYTE, 2, dtype=torch.int32, device=codes.device).view(1, -1, 1)
    return (quarters << shifts).sum(dim=1).to(torch.uint8)


def unpack_ternary(packed: torch.Tensor, validate: bool = False) -> torch.Tensor:
    """uint8 [N, K / 4] -> int8 codes in {-1, 0, 1} [N, K]; `validate` rejects the unused code 3."""
    if packed.dtype != torch.uint8:
        raise CheckpointError(f"packed ternary weights must be uint8, got {packed.dtype}")
    shifts = torch.arange(0, 2 * CODES_PER_BYTE, 2, dtype=torch.uint8, device=packed.device).view(1, -1, 1)
    fields = (packed.unsqueeze(1) >> shifts) & 3  # [N, 4, K/4]
    if validate and fields.numel() and fields.max() > 2:
        raise CheckpointError(
            "packed ternary weights hold the unused 2-bit code 3 (corrupt or not BitCPM format)"
        )
    return (fields.to(torch.int8) - 1).flatten(1)
