"""The 2-bit packed ternary format: hand-computed bytes, round trips, corrupt input."""

from __future__ import annotations

import pytest
import torch

from rlcpm.errors import CheckpointError
from rlcpm.kernels.ternary import pack_ternary, unpack_ternary


def test_hand_packed_bytes():
    # K = 8: quarters of Q = 2 columns; byte j holds columns j, 2 + j, 4 + j, 6 + j at bits 0, 2, 4, 6
    codes = torch.tensor([[1, 0, -1, 1, 0, -1, 1, 1]])
    # byte 0: c0+1=2, c2+1=0, c4+1=1, c6+1=2 -> 2 | 0<<2 | 1<<4 | 2<<6 = 2 + 16 + 128 = 146
    # byte 1: c1+1=1, c3+1=2, c5+1=0, c7+1=2 -> 1 | 2<<2 | 0<<4 | 2<<6 = 1 + 8 + 128 = 137
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[146, 137]]
    assert unpack_ternary(packed).tolist() == codes.tolist()


@pytest.mark.parametrize("shape", [(1, 4), (7, 12), (64, 256), (3, 1000)])
def test_round_trip(shape):
    codes = torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(sum(shape)))
    packed = pack_ternary(codes)
    assert packed.shape == (shape[0], shape[1] // 4)
    assert torch.equal(unpack_ternary(packed, validate=True), codes.to(torch.int8))


def test_input_dimension_must_be_a_multiple_of_four():
    with pytest.raises(CheckpointError, match="input dimension 10 must be a multiple of 4"):
        pack_ternary(torch.zeros(2, 10, dtype=torch.int8))


def test_non_ternary_codes_are_rejected():
    with pytest.raises(CheckpointError, match="must be -1, 0 or 1"):
        pack_ternary(torch.tensor([[0, 2, 0, 0]]))


def test_unused_code_three_is_rejected_on_validation():
    with pytest.raises(CheckpointError, match="unused 2-bit code 3"):
        unpack_ternary(torch.tensor([[0b00000011]], dtype=torch.uint8), validate=True)
    with pytest.raises(CheckpointError, match="must be uint8"):
        unpack_ternary(torch.zeros(1, 2, dtype=torch.int8))
