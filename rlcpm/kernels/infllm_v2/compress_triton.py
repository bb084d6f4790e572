"""Triton kernel for `mean_pool_windows` (same signature as compress.mean_pool_windows_reference)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlcpm.kernels.triton_utils import check_inputs, next_pow2


@triton.jit
def _mean_pool_kernel(
    KEYS,
    ROWS,
    OUT,
    stride_kr,
    stride_kh,
    stride_rn,
    stride_on,
    stride_oh,
    WINDOW: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0)
    h = tl.program_id(1)
    offs_w = tl.arange(0, BLOCK_W)
    offs_d = tl.arange(0, BLOCK_D)
    w_mask = offs_w < WINDOW
    rows = tl.load(ROWS + n * stride_rn + offs_w, mask=w_mask, other=0).to(tl.int64)
    mask = w_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    keys = tl.load(KEYS + rows[:, None] * stride_kr + h * stride_kh + offs_d[None, :], mask=mask, other=0.0)
    mean = tl.sum(keys.to(tl.float32), axis=0) / WINDOW
    tl.store(
        OUT + n * stride_on + h * stride_oh + offs_d, mean.to(OUT.dtype.element_ty), mask=offs_d < HEAD_DIM
    )


def mean_pool_windows_triton(keys: torch.Tensor, window_rows: torch.Tensor) -> torch.Tensor:
    """keys [R, H, D], window_rows [N, k] int64 -> [N, H, D] (float32 accumulation, keys.dtype out)."""
    check_inputs("mean_pool_windows", (torch.float32, torch.bfloat16, torch.float16), keys=keys)
    num, window = window_rows.shape
    out = keys.new_empty(num, keys.shape[1], keys.shape[2])
    if num == 0:
        return out
    window_rows = window_rows.contiguous()
    _mean_pool_kernel[(num, keys.shape[1])](
        keys,
        window_rows,
        out,
        keys.stride(0),
        keys.stride(1),
        window_rows.stride(0),
        out.stride(0),
        out.stride(1),
        WINDOW=window,
        HEAD_DIM=keys.shape[2],
        BLOCK_W=next_pow2(window),
        BLOCK_D=next_pow2(keys.shape[2]),
    )
    return out
