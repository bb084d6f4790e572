"""Triton ternary matmul under TRITON_INTERPRET=1 against its PyTorch reference, and the dispatch checks."""

from __future__ import annotations

import importlib
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates the kernel: run it on the CPU

import pytest
import torch
import torch.nn.functional as F

from rlcpm.errors import EngineError
from rlcpm.kernels.ternary import dequantize_ternary, pack_ternary, ternary_matmul, ternary_matmul_reference
from rlcpm.kernels.ternary.triton_matmul import uses_group_dots


@pytest.fixture(scope="module")
def triton_matmul():
    pytest.importorskip("triton")
    module = importlib.import_module("rlcpm.kernels.ternary.triton_matmul")
    if "Interpreted" not in type(module._ternary_matmul_kernel).__name__:
        module = importlib.reload(module)  # imported earlier without the interpreter
    return module.ternary_matmul_triton


def _operands(m, n, k, group_size, dtype=torch.float32, seed=0, bias=False):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (n, k), generator=generator)
    scales = (torch.rand(n, k // group_size, generator=generator) + 0.05).to(dtype)
    x = torch.randn(m, k, generator=generator).to(dtype)
    b = torch.randn(n, generator=generator).to(dtype) if bias else None
    return x, pack_ternary(codes), scales, b


def test_reference_is_a_dense_matmul_with_codes_times_scales():
    x, packed, scales, bias = _operands(3, 8, 64, 32, bias=True)
    weight = dequantize_ternary(packed, scales, 32, torch.float32)
    assert set(weight.abs().unique().tolist()) <= {0.0, *scales.flatten().tolist()}
    torch.testing.assert_close(ternary_matmul_reference(x, packed, scales, 32, bias), x @ weight.T + bias)


# (M, N, K, g): decode (M=1) and prefill-like M; N and K/4 not multiples of the tiles; g in {8, 32, 64, 128};
# both schedules: group dots (g a power of two >= 16 dividing K/4) and per-element scales
SHAPES = [
    (1, 64, 256, 32),
    (3, 40, 96, 32),
    (16, 70, 512, 64),
    (33, 24, 200, 8),
    (70, 130, 384, 32),
    (17, 36, 1024, 128),
]


def _id(shape):
    m, n, k, g = shape
    return f"{m}x{n}x{k}-g{g}-{'group_dots' if uses_group_dots(k, g) else 'per_element'}"


def test_shapes_cover_both_schedules():
    assert {uses_group_dots(k, g) for _, _, k, g in SHAPES} == {True, False}


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_triton_kernel_matches_reference_float32(triton_matmul, shape):
    m, n, k, g = shape
    x, packed, scales, bias = _operands(m, n, k, g, seed=m + n, bias=m % 2 == 1)
    expected = ternary_matmul_reference(x, packed, scales, g, bias)
    torch.testing.assert_close(triton_matmul(x, packed, scales, g, bias), expected, rtol=1e-5, atol=1e-4)


def test_triton_kernel_tiles_and_strides(triton_matmul):
    """Explicit small tiles (several K iterations, partial last tile) and a non-contiguous x."""
    for k in (160, 512):  # per-element and group-dot schedules
        x, packed, scales, bias = _operands(20, 36, k, 32, seed=7, bias=True)
        expected = ternary_matmul_reference(x, packed, scales, 32, bias)
        for config in (
            {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_J": 32},
            {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_J": 64},
        ):
            out = triton_matmul(x, packed, scales, 32, bias, config=config)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
        x_strided = torch.randn(k, 20).T  # stride (1, 20)
        out = triton_matmul(x_strided, packed, scales, 32)
        torch.testing.assert_close(
            out, ternary_matmul_reference(x_strided, packed, scales, 32), rtol=1e-5, atol=1e-4
        )


@pytest.mark.parametrize("k", [96, 128], ids=["per_element", "group_dots"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_kernel_16_bit(triton_matmul, dtype, k):
    """16-bit x and scales: float32 accumulation, one final rounding; within 2 ulps of the exact
    float32 result (the interpreter truncates to bfloat16 where GPUs round to nearest)."""
    x, packed, scales, bias = _operands(5, 48, k, 32, dtype=dtype, bias=True)
    out = triton_matmul(x, packed, scales, 32, bias)
    assert out.dtype == dtype
    weight = dequantize_ternary(packed, scales, 32, dtype).float()  # the 16-bit weight, exactly
    expected = x.float() @ weight.T + bias.float()
    torch.testing.assert_close(out.float(), expected, rtol=2 * torch.finfo(dtype).eps, atol=1e-4)


def test_dispatch_runs_the_reference_on_cpu_and_keeps_leading_dims(monkeypatch):
    monkeypatch.delenv("RLCPM_KERNELS", raising=False)
    x, packed, scales, bias = _operands(6, 8, 64, 32, bias=True)
    out = ternary_matmul(x.view(2, 3, 64), packed, scales, 32, bias)
    assert out.shape == (2, 3, 8)
    weight = dequantize_ternary(packed, scales, 32, torch.float32)
    torch.testing.assert_close(out, F.linear(x, weight, bias).view(2, 3, 8), rtol=0, atol=0)


def test_dispatch_rejects_mismatched_operands():
    x, packed, scales, _ = _operands(2, 8, 64, 32)
    with pytest.raises(EngineError, match="x has 60 input features, the packed weight"):
        ternary_matmul(x[:, :60], packed, scales, 32)
    with pytest.raises(EngineError, match="group_size 48 does not divide the input dimension 64"):
        ternary_matmul(x, packed, scales, 48)
    with pytest.raises(EngineError, match=r"scales have shape \(8, 2\), expected \(8, 4\)"):
        ternary_matmul(x, packed, scales, 16)
    with pytest.raises(EngineError, match="must be uint8"):
        ternary_matmul(x, packed.to(torch.int16), scales, 32)
