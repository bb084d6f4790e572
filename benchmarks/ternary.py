"""Ternary (BitCPM) matmul vs dense: weight bytes and time, side by side in one run.

    python -m benchmarks.ternary                 # CPU: PyTorch reference path vs dense F.linear
    python -m benchmarks.ternary --gpu           # CUDA: Triton kernel vs dense bf16 torch matmul
    python -m benchmarks.ternary --gpu --sweep   # also time every tile configuration per shape

For each weight shape [N, K] and each number of tokens M: y = x W^T with x [M, K].
Dense: F.linear on a bf16 (GPU) / fp32 and bf16 (CPU) weight. Ternary: 2-bit packed codes +
one bf16 scale per group of 32 inputs (rlcpm.kernels.ternary). Bytes are those of the weight
operands (dense: N*K*2 in bf16; ternary: N*K/4 + N*K/32*2). The GPU mode first checks the
Triton kernel against the PyTorch reference on every benchmarked shape (and a few odd ones)
and stops if they disagree. Writes benchmarks/results/ternary_cpu.json or ternary_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import machine_info
from rlcpm.kernels.ternary import pack_ternary, ternary_matmul_reference

RESULTS = Path(__file__).parent / "results"
GROUP_SIZE = 32
CPU_SHAPES = [(1024, 1024), (4096, 1024), (1024, 4096)]  # (N, K): a ~0.5B model's projections
GPU_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # Llama-3-8B / MiniCPM4-8B-like
TOKENS = [1, 16, 128]
SWEEP_CONFIGS = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_J": bj, "num_warps": w, "num_stages": st}
    for bm, bn, bj, w, st in [
        (16, 32, 64, 4, 3),
        (16, 64, 64, 4, 3),
        (16, 64, 128, 4, 3),
        (16, 128, 64, 4, 3),
        (16, 32, 128, 4, 4),
        (16, 16, 128, 2, 4),
        (16, 32, 256, 4, 3),
        (32, 128, 64, 4, 3),
        (32, 64, 64, 4, 3),
        (64, 64, 32, 4, 2),
        (64, 128, 32, 4, 3),
        (64, 128, 64, 8, 2),
        (128, 128, 32, 8, 2),
        (128, 128, 64, 8, 2),
        (128, 256, 32, 8, 2),
    ]
]


def ternary_operands(n: int, k: int, device: str, scale_dtype: torch.dtype, seed: int = 0):
    """Random codes packed to uint8 [N, K/4] and positive scales [N, K/32]."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (n, k), generator=generator, dtype=torch.int8)
    scales = (torch.rand(n, k // GROUP_SIZE, generator=generator) * 0.02 + 1e-3).to(scale_dtype)
    return pack_ternary(codes).to(device), scales.to(device)


def weight_bytes(n: int, k: int) -> dict[str, int]:
    dense = n * k * 2
    ternary = n * k // 4 + n * (k // GROUP_SIZE) * 2
    return {"dense_bf16_bytes": dense, "ternary_bytes": ternary, "bytes_ratio": dense / ternary}


# ------------------------------------------------------------------------------------------ CPU


def time_cpu(fn, min_seconds: float = 0.3, min_runs: int = 5) -> float:
    """Median wall time of fn() in ms (after one warm-up call)."""
    fn()
    times, started = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run_cpu() -> dict:
    rows = []
    for n, k in CPU_SHAPES:
        packed, scales = ternary_operands(n, k, "cpu", torch.bfloat16)
        for dtype in (torch.float32, torch.bfloat16):
            dense = torch.randn(n, k, dtype=dtype) * 0.02
            for m in TOKENS:
                x = torch.randn(m, k, dtype=dtype)
                dense_ms = time_cpu(partial(F.linear, x, dense))
                ternary_ms = time_cpu(partial(ternary_matmul_reference, x, packed, scales, GROUP_SIZE))
                rows.append(
                    {
                        "N": n,
                        "K": k,
                        "M": m,
                        "dtype": str(dtype).removeprefix("torch."),
                        "dense_ms": dense_ms,
                        "ternary_reference_ms": ternary_ms,
                        "ternary_over_dense_time": ternary_ms / dense_ms,
                        **weight_bytes(n, k),
                    }
                )
                print_row(rows[-1], ("dense_ms", "ternary_reference_ms"))
    return {
        "device": "cpu",
        "machine": machine_info(),
        "group_size": GROUP_SIZE,
        "note": "CPU path = PyTorch reference (unpack + dense matmul per call): it saves memory at rest, not time",
        "results": rows,
    }


# ------------------------------------------------------------------------------------------ GPU


def self_check(ternary_matmul_triton) -> list[dict]:
    """Triton kernel vs reference on the benchmarked shapes and odd ones; raises on disagreement."""
    checks = []
    shapes = [(m, n, k) for n, k in GPU_SHAPES for m in TOKENS] + [
        (3, 200, 96),
        (70, 130, 384),
        (1, 36, 4128),
    ]
    for m, n, k in shapes:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            packed, scales = ternary_operands(n, k, "cuda", dtype, seed=m + n)
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            bias = torch.randn(n, device="cuda", dtype=dtype)
            out = ternary_matmul_triton(x, packed, scales, GROUP_SIZE, bias).float()
            # the reference in float32 from the same 16-bit operands: the kernel's accumulation is float32
            expected = ternary_matmul_reference(x.float(), packed, scales.float(), GROUP_SIZE, bias.float())
            error = (out - expected).abs().max().item()
            scale = expected.abs().max().item()
            tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype] * scale
            checks.append(
                {"M": m, "N": n, "K": k, "dtype": str(dtype).removeprefix("torch."), "max_abs_error": error}
            )
            if not error <= tolerance:
                raise SystemExit(
                    f"self-check failed: M={m} N={n} K={k} {dtype}: max error {error} > {tolerance}"
                )
    from rlcpm.kernels.dispatch import use_triton
    from rlcpm.kernels.ternary import ternary_matmul

    if not use_triton(torch.device("cuda")):
        raise SystemExit("self-check failed: the dispatch does not pick the Triton kernel on CUDA")
    packed, scales = ternary_operands(256, 512, "cuda", torch.bfloat16)
    x = torch.randn(2, 7, 512, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(
        ternary_matmul(x, packed, scales, GROUP_SIZE).view(14, 256),
        ternary_matmul_triton(x.view(14, 512), packed, scales, GROUP_SIZE),
        rtol=0,
        atol=0,
    )
    print(f"self-check: {len(checks)} cases, Triton == reference; dispatch picks Triton on CUDA")
    return checks


def run_gpu(sweep: bool) -> dict:
    import triton

    from rlcpm.kernels.ternary.triton_matmul import _launch_config, ternary_matmul_triton

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    checks = self_check(ternary_matmul_triton)

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, warmup=25, rep=100)  # median ms

    rows = []
    for n, k in GPU_SHAPES:
        packed, scales = ternary_operands(n, k, "cuda", torch.bfloat16)
        dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for m in TOKENS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            dense_ms = bench(partial(F.linear, x, dense))
            ternary_ms = bench(partial(ternary_matmul_triton, x, packed, scales, GROUP_SIZE))
            sizes = weight_bytes(n, k)
            row = {
                "N": n,
                "K": k,
                "M": m,
                "dtype": "bfloat16",
                "dense_ms": dense_ms,
                "ternary_triton_ms": ternary_ms,
                "speedup": dense_ms / ternary_ms,
                "dense_weight_GBps": sizes["dense_bf16_bytes"] / dense_ms / 1e6,
                "ternary_weight_GBps": sizes["ternary_bytes"] / ternary_ms / 1e6,
                "config": _launch_config(m, torch.bfloat16),
                **sizes,
            }
            if sweep:
                timed = []
                for config in SWEEP_CONFIGS:
                    try:
                        ms = bench(
                            partial(ternary_matmul_triton, x, packed, scales, GROUP_SIZE, config=config)
                        )
                    except Exception as err:  # a config the compiler rejects (shared memory): skip it
                        print(f"  config {config} failed: {type(err).__name__}")
                        continue
                    timed.append((ms, config))
                best_ms, best = min(timed, key=lambda t: t[0])
                row.update(best_sweep_ms=best_ms, best_sweep_config=best)
            rows.append(row)
            print_row(row, ("dense_ms", "ternary_triton_ms", "best_sweep_ms"))
    return {
        "device": "cuda",
        "machine": machine_info(),
        "triton": triton.__version__,
        "group_size": GROUP_SIZE,
        "timing": "triton.testing.do_bench median, warmup 25 ms, rep 100 ms",
        "self_check": checks,
        "results": rows,
    }


def print_row(row: dict, keys: tuple[str, ...]) -> None:
    times = "  ".join(f"{key}={row[key]:.4f}" for key in keys if key in row)
    print(
        f"N={row['N']:>5} K={row['K']:>5} M={row['M']:>3} {row['dtype']:>8}  {times}  bytes/{row['bytes_ratio']:.2f}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpu", action="store_true", help="Triton kernel vs dense bf16 on CUDA")
    parser.add_argument("--sweep", action="store_true", help="with --gpu: time every tile configuration")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    result = run_gpu(args.sweep) if args.gpu else run_cpu()
    out = args.out or RESULTS / ("ternary_gpu.json" if args.gpu else "ternary_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
