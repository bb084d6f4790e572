"""Triton ternary matmul: y = x W^T (+ b) reading W as 2-bit codes + group scales.

Each program computes a [BLOCK_M, BLOCK_N] tile of y, walking the packed weight in tiles of
BLOCK_J bytes per output row. A packed tile [BLOCK_J, BLOCK_N] holds the codes of BLOCK_J
columns in each of the four quarters of K (Q = K / 4; rlcpm.kernels.ternary.packing), so
bit pair i of the tile feeds a dense dot with x[:, i*Q + j]. Two schedules:

group dots (when g is a power of two >= 16 and divides Q; every real model), BLOCK_J = m * g:

    for each group G of the tile, quarter i:     c = ((packed >> 2i) & 3) - 1    [g, BLOCK_N], exact in x's dtype
        acc += (x[:, G] @ c) * s[G, n]           one scale row per group, applied to the partial sum

per element (any other shape):

    w = c * s[n, k // g]                         dequantized in registers, scales gathered per element
    acc += x[:, i*Q + j] @ w

Both accumulate in float32 and read the weight once at 2 bits per value plus the scales.
The group-dot schedule sums each group before scaling, so its rounding differs from the
reference's x @ (c * s) in the last float32 bits. Edges in M and N are masked (and K in the
per-element schedule); the wrapper checks K % 4 == 0 and K % g == 0.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _ternary_matmul_kernel(
    x_ptr,
    packed_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    QUARTER,  # K / 4: packed bytes per output row
    stride_xm,
    stride_xk,
    stride_pn,
    stride_pj,
    stride_sn,
    stride_sg,
    stride_om,
    stride_on,
    GROUP_SIZE: tl.constexpr,
    GROUP_DOTS: tl.constexpr,  # the group-dot schedule (see the module docstring)
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only: dot in float32 (numpy has no bfloat16)
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no TF32); ignored for 16-bit inputs
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output features
    row_ok = rows < M
    col_ok = cols < N
    # tl.full, not tl.zeros: tl.zeros is a @jit helper, which TRITON_INTERPRET=1 cannot call when
    # triton was imported before the variable was set (as in a test session)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    if GROUP_DOTS:
        for j0 in range(0, QUARTER, BLOCK_J):
            for sub in tl.static_range(BLOCK_J // GROUP_SIZE):
                js = j0 + sub * GROUP_SIZE + tl.arange(0, GROUP_SIZE)  # [g] bytes: one group per quarter
                j_ok = js < QUARTER  # whole groups: Q is a multiple of g
                packed = tl.load(
                    packed_ptr + js[:, None] * stride_pj + cols[None, :] * stride_pn,
                    mask=j_ok[:, None] & col_ok[None, :],
                    other=0,
                )  # [g, BN] uint8
                for quarter in tl.static_range(4):
                    ks = quarter * QUARTER + js
                    x = tl.load(
                        x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                        mask=row_ok[:, None] & j_ok[None, :],
                        other=0.0,
                    )  # [BM, g]
                    codes = ((packed >> (2 * quarter)) & 3).to(tl.int8) - 1  # [g, BN] in {-1, 0, 1}
                    group = (quarter * QUARTER + j0 + sub * GROUP_SIZE) // GROUP_SIZE
                    scale = tl.load(
                        scale_ptr + group * stride_sg + cols * stride_sn,
                        mask=col_ok & (tl.full((BLOCK_N,), j0 + sub * GROUP_SIZE, tl.int32) < QUARTER),
                        other=0.0,
                    ).to(tl.float32)  # [BN]
                    if UPCAST:
                        part = tl.dot(x.to(tl.float32), codes.to(tl.float32), input_precision="ieee")
                    else:
                        part = tl.dot(x, codes.to(x.dtype), input_precision=DOT_PRECISION)  # exact cast
                    acc += part * scale[None, :]
    else:
        for j0 in range(0, QUARTER, BLOCK_J):
            js = j0 + tl.arange(0, BLOCK_J)  # [BJ] byte index within a row
            j_ok = js < QUARTER
            w_ok = j_ok[:, None] & col_ok[None, :]
            packed = tl.load(
                packed_ptr + js[:, None] * stride_pj + cols[None, :] * stride_pn, mask=w_ok, other=0
            )  # [BJ, BN] uint8
            for quarter in tl.static_range(4):
                ks = quarter * QUARTER + js  # [BJ] input columns held by this bit pair
                codes = ((packed >> (2 * quarter)) & 3).to(tl.float32) - 1.0
                scales = tl.load(
                    scale_ptr + (ks // GROUP_SIZE)[:, None] * stride_sg + cols[None, :] * stride_sn,
                    mask=w_ok,
                    other=0.0,
                ).to(tl.float32)
                x = tl.load(
                    x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & j_ok[None, :],
                    other=0.0,
                )  # [BM, BJ]
                w = (codes * scales).to(x.dtype)  # [BJ, BN], exact: codes are -1, 0, 1
                if UPCAST:
                    acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(x, w, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def uses_group_dots(in_features: int, group_size: int) -> bool:
    """Whether the group-dot schedule applies: g a power of two >= 16 dividing K / 4."""
    quarter = in_features // 4
    return group_size >= 16 and group_size & (group_size - 1) == 0 and quarter % group_size == 0


def _launch_config(num_rows: int, dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes, from a sweep on an H100 (benchmarks/ternary.py --gpu --sweep): BLOCK_M 16 for
    decode batches, 64 x 128 tiles above; float32 tiles take twice the shared memory, so they
    stay small (227 KiB per block on Hopper)."""
    if dtype == torch.float32:
        return {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_J": 32, "num_warps": 4, "num_stages": 2}
    if num_rows <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_J": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_J": 32, "num_warps": 4, "num_stages": 3}


def ternary_matmul_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Launch the kernel: x [M, K], packed uint8 [N, K / 4], scales [N, K / g] -> y [M, N].

    Shapes are assumed checked (rlcpm.kernels.ternary.ternary_matmul does it); `config`
    overrides the tile sizes (BLOCK_M, BLOCK_N, BLOCK_J, num_warps, num_stages).
    """
    num_rows, num_out = x.shape[0], packed.shape[0]
    out = torch.empty((num_rows, num_out), dtype=x.dtype, device=x.device)
    launch = dict(config or _launch_config(num_rows, x.dtype))
    num_warps, num_stages = launch.pop("num_warps", 4), launch.pop("num_stages", 2)
    group_dots = uses_group_dots(packed.shape[1] * 4, group_size)
    if group_dots:  # whole groups per tile
        launch["BLOCK_J"] = max(group_size, launch["BLOCK_J"] // group_size * group_size)
    grid = (triton.cdiv(num_rows, launch["BLOCK_M"]), triton.cdiv(num_out, launch["BLOCK_N"]))
    _ternary_matmul_kernel[grid](
        x,
        packed,
        scales,
        bias if bias is not None else out,  # unused pointer when HAS_BIAS is False
        out,
        num_rows,
        num_out,
        packed.shape[1],
        x.stride(0),
        x.stride(1),
        packed.stride(0),
        packed.stride(1),
        scales.stride(0),
        scales.stride(1),
        out.stride(0),
        out.stride(1),
        GROUP_SIZE=group_size,
        GROUP_DOTS=group_dots,
        HAS_BIAS=bias is not None,
        UPCAST=os.environ.get("TRITON_INTERPRET") == "1" and x.dtype != torch.float32,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
        **launch,
    )
    return out
