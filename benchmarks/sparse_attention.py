"""InfLLM v2 sparse attention vs dense attention, side by side in one run.

    python -m benchmarks.sparse_attention                     # CPU: decode attention per token
    python -m benchmarks.sparse_attention --gpu               # CUDA: self-check, then prefill + decode
    python -m benchmarks.sparse_attention --gpu --check-only  # CUDA: kernels vs references only

Shapes are MiniCPM4-8B's attention (32 query heads, 2 KV heads, head dim 128) with its
sparse_config (kernel 32/16, block 64, window 2048, topk 64: 96 blocks = 6144 keys per query),
dense_len -1 so that every query takes the sparse path.

CPU (PyTorch reference path, float32): one decode step of one sequence at 8k / 32k / 64k
context, per layer, through the model's attention backends over the engine's paged KV cache:
`sparse` (KV write, incremental Kc1/Kc2, stage 1, top-k, stage 2 over the selected blocks),
`dense` (gathers the context from the pages, SDPA), and dense SDPA over a contiguous copy of the
KV (the engine's CPU decode mirror; the lower bound of dense). Steps alternate between the
three; medians. Writes benchmarks/results/sparse_attention_cpu.json.

GPU (Triton kernels, bfloat16): first every kernel is checked against its PyTorch reference on
small shapes (max errors printed; stops if one is off). Then prefill (the whole forward over T
tokens: compression, stage 1 + top-k, stage 2) vs torch SDPA flash causal at 32k-128k, and
decode (a batch of sequences, one new token each: stage 1 + top-k + split-KV decode) vs SDPA
flash over the contiguous KV. CUDA events after warm-up. Writes
benchmarks/results/sparse_attention_gpu.json with the GPU's name.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import rlcpm  # noqa: F401
except ImportError:  # a GPU image without rlcpm's full dependency set: load the subpackages alone
    _package = types.ModuleType("rlcpm")
    _package.__path__ = [str(Path(__file__).resolve().parents[1] / "rlcpm")]
    sys.modules["rlcpm"] = _package

from benchmarks.common import machine_info, write_result  # noqa: E402
from benchmarks.sparse_attention_check import gpu_check, packed_inputs  # noqa: E402
from rlcpm.kernels.infllm_v2 import InfLLMv2Config  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 2, 128
SPARSE = InfLLMv2Config(dense_len=-1)
DEVICE = "cuda"  # where the --gpu timings run (a CPU dry run under TRITON_INTERPRET=1 sets "cpu")


def _fmt(rows: list[dict], columns: list[str]) -> str:
    lines = ["  ".join(f"{c:>22}" for c in columns)]
    for row in rows:
        lines.append(
            "  ".join(f"{row[c]:>22.4g}" if isinstance(row[c], float) else f"{row[c]:>22}" for c in columns)
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- CPU


def cpu_decode(contexts: list[int], layers: int, steps: int, warmup: int) -> list[dict]:
    rows = []
    for ctx in contexts:
        rows.append(_cpu_decode_at(ctx, layers, steps, warmup))
        print(_fmt([rows[-1]], list(rows[-1])), flush=True)
    return rows


def _cpu_decode_at(ctx: int, layers: int, steps: int, warmup: int) -> dict:
    from rlcpm.models.config import ModelConfig
    from rlcpm.models.dense_attention import DenseAttention
    from rlcpm.models.kv_cache import PagedKVCache
    from rlcpm.models.metadata import AttentionMetadata
    from rlcpm.models.sparse_attention import SparseAttention

    config = ModelConfig(
        hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        num_hidden_layers=layers, sparse_config=SPARSE.to_dict(),
    )  # fmt: skip
    sparse, dense = SparseAttention(config), DenseAttention(config)
    page = 16  # the engine's default KV block size
    gen = torch.Generator().manual_seed(0)
    pages = -(-(ctx + 1) // page)
    cache = PagedKVCache(layers, pages, page, KV_HEADS, HEAD_DIM)
    cache.storage.normal_(generator=gen)
    table = [list(range(pages))]
    prefill = AttentionMetadata.paged([ctx], [ctx], table, page)
    for layer in range(layers):
        sparse._update_compressed(prefill, layer, cache)  # Kc1/Kc2 of the prompt, as after prefill
    contiguous = [
        [
            x.view(-1, KV_HEADS, HEAD_DIM)[: ctx + 1].transpose(0, 1)[None].contiguous()
            for x in (cache.k[i], cache.v[i])
        ]
        for i in range(layers)
    ]  # [1, Hkv, ctx+1, D]
    q = torch.randn(1, HEADS, HEAD_DIM, generator=gen)
    k, v = torch.randn(2, 1, KV_HEADS, HEAD_DIM, generator=gen)

    def run_backend(backend):
        meta = AttentionMetadata.paged([1], [ctx + 1], table, page)  # built every step, as the engine does
        for layer in range(layers):
            backend.forward(q, k, v, meta, layer, cache)

    def run_contiguous():
        grouped = q.view(1, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)  # a decode query per group head
        for keys, values in contiguous:
            F.scaled_dot_product_attention(grouped, keys, values, scale=HEAD_DIM**-0.5)

    runs = {"sparse": lambda: run_backend(sparse), "dense_paged": lambda: run_backend(dense),
            "dense_contiguous": run_contiguous}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for step in range(warmup + steps):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                if step >= warmup:
                    times[name].append((time.perf_counter() - start) / layers * 1e3)
    row = {"context": ctx, **{f"{name}_ms": statistics.median(t) for name, t in times.items()}}
    row["speedup_vs_dense_paged"] = row["dense_paged_ms"] / row["sparse_ms"]
    row["speedup_vs_dense_contiguous"] = row["dense_contiguous_ms"] / row["sparse_ms"]
    row["keys_attended_sparse"] = min(SPARSE.num_selected * SPARSE.block_size, ctx + 1)
    return row


# ------------------------------------------------------------------------------------- GPU


def _cuda_time(fn, warmup: int = 2, reps: int = 5, budget_s: float = 4.0) -> float:
    """Median milliseconds of fn() with CUDA events (fewer reps when one call is slow)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    began = time.perf_counter()
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        if time.perf_counter() - began > budget_s:
            break
    return statistics.median(times)


def _dense_prefill(q, k, v):
    """SDPA flash causal over [1, H, T, D] (GQA natively when the flash kernel takes it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        try:
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
        except RuntimeError:
            group = q.shape[1] // k.shape[1]
            return F.scaled_dot_product_attention(
                qt, kt.repeat_interleave(group, 1), vt.repeat_interleave(group, 1), is_causal=True
            )


def gpu_prefill(lengths: list[int]) -> list[dict]:
    rows = []
    for total in lengths:
        rows.append(_gpu_prefill_at(total))
        print(_fmt([rows[-1]], list(rows[-1])), flush=True)
        torch.cuda.empty_cache()
    return rows


def _gpu_prefill_at(total: int) -> dict:
    from rlcpm.kernels.infllm_v2 import (
        block_sparse_attention,
        compress_keys,
        infllm_v2_attention,
        select_blocks,
    )
    from rlcpm.kernels.infllm_v2.functional import packed_queries
    from rlcpm.kernels.infllm_v2.layout import KeyLayout

    q, k, v, cu = packed_inputs([total], HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16, device=DEVICE)
    q_seq, q_pos = packed_queries(cu)
    scale = HEAD_DIM**-0.5
    with torch.no_grad():
        dense_ms = _cuda_time(lambda: _dense_prefill(q, k, v))
        sparse_ms = _cuda_time(lambda: infllm_v2_attention(q, k, v, cu, SPARSE))

        def compress():
            return (*compress_keys(k, cu, 32, 16), *compress_keys(k, cu, 128, 64))

        compressed = compress()
        compress_ms = _cuda_time(compress)
        select_ms = _cuda_time(lambda: select_blocks(q, q_seq, q_pos, *compressed, SPARSE, scale))
        idx = select_blocks(q, q_seq, q_pos, *compressed, SPARSE, scale)
        layout = KeyLayout.packed(cu)
        stage2_ms = _cuda_time(lambda: block_sparse_attention(q, k, v, layout, q_seq, q_pos, idx, 64, scale))
    return {"tokens": total, "dense_sdpa_flash_ms": dense_ms, "sparse_ms": sparse_ms,
            "speedup": dense_ms / sparse_ms, "compress_ms": compress_ms, "select_ms": select_ms,
            "stage2_ms": stage2_ms}  # fmt: skip


def gpu_decode(contexts: list[int], batch: int) -> list[dict]:
    rows = []
    for ctx in contexts:
        rows.append(_gpu_decode_at(ctx, batch))
        print(_fmt([rows[-1]], list(rows[-1])), flush=True)
        torch.cuda.empty_cache()
    return rows


def _gpu_decode_at(ctx: int, batch: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from rlcpm.kernels.infllm_v2 import compress_keys, select_blocks, sparse_decode_attention
    from rlcpm.kernels.infllm_v2.layout import KeyLayout

    scale = HEAD_DIM**-0.5
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    keys = torch.randn(batch, ctx, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    values = torch.randn_like(keys)
    q = torch.randn(batch, HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    # Sparse: the paged cache (64-token pages, in order) and each sequence's Kc1/Kc2.
    page = 64
    k_cache, v_cache = keys.reshape(-1, KV_HEADS, HEAD_DIM), values.reshape(-1, KV_HEADS, HEAD_DIM)
    tables = torch.arange(batch * ctx // page, device=DEVICE, dtype=torch.int32).view(batch, -1)
    layout = KeyLayout.paged(tables, page)
    cu = torch.arange(batch + 1, device=DEVICE, dtype=torch.int32) * ctx
    kc1, cu1 = compress_keys(k_cache, cu, 32, 16)
    kc2, cu2 = compress_keys(k_cache, cu, 128, 64)
    rows1 = torch.arange(kc1.shape[0], device=DEVICE)
    rows2 = torch.arange(kc2.shape[0], device=DEVICE)
    q_seq = torch.arange(batch, device=DEVICE)
    q_pos = torch.full((batch,), ctx - 1, device=DEVICE)

    def sparse_step():
        c1, c2 = kc1[rows1], kc2[rows2]  # the engine gathers them from the paged compressed cache
        idx = select_blocks(q, q_seq, q_pos, c1, cu1, c2, cu2, SPARSE, scale)
        return sparse_decode_attention(q, k_cache, v_cache, layout, q_pos, idx, 64, scale)

    # Dense: one query per group head against the contiguous KV of its KV head (exact for decode).
    k_dense, v_dense = (
        keys.transpose(1, 2).contiguous(),
        values.transpose(1, 2).contiguous(),
    )  # [B, Hkv, L, D]
    grouped = q.view(batch, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)

    def dense_step():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(grouped, k_dense, v_dense, scale=scale)

    with torch.no_grad():
        dense_ms, sparse_ms = _cuda_time(dense_step, reps=20), _cuda_time(sparse_step, reps=20)
    return {"context": ctx, "batch": batch, "dense_sdpa_flash_us_per_token": dense_ms * 1e3 / batch,
            "sparse_us_per_token": sparse_ms * 1e3 / batch, "speedup": dense_ms / sparse_ms}  # fmt: skip


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="time the Triton kernels on CUDA")
    parser.add_argument("--check-only", action="store_true", help="with --gpu: kernels vs references only")
    parser.add_argument("--contexts", type=int, nargs="*", help="CPU: decode contexts (default 8k 32k 64k)")
    parser.add_argument("--layers", type=int, default=4, help="CPU: layers per timed step")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU: torch threads (1: the machine is shared)"
    )
    parser.add_argument("--batch", type=int, default=16, help="GPU: decoding sequences")
    parser.add_argument("--out", default=None, help="result file name (default sparse_attention_cpu/gpu)")
    args = parser.parse_args(argv)
    if args.check_only and not args.gpu:  # else it would run (and write) the CPU benchmark
        parser.error("--check-only checks the Triton kernels on CUDA: use it with --gpu")
    if args.gpu:
        if not torch.cuda.is_available():
            print("--gpu: no CUDA device", file=sys.stderr)
            return 2
        print(f"GPU: {torch.cuda.get_device_name(0)}\nchecking kernels against references:", flush=True)
        ok, checks = gpu_check()
        payload = {"machine": machine_info(), "gpu": torch.cuda.get_device_name(0), "sparse": SPARSE.to_dict(),
                   "shapes": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16"},
                   "checks": checks}  # fmt: skip
        try:
            import triton

            payload["triton"] = triton.__version__
        except ImportError:
            pass
        if not ok:
            print("kernel check FAILED: not timing", file=sys.stderr)
            write_result(args.out or "sparse_attention_gpu_check", payload)
            return 1
        if args.check_only:
            print("all kernel checks passed")
            return 0
        print("prefill (forward over T tokens):", flush=True)
        payload["prefill"] = gpu_prefill([32768, 65536, 131072])
        print(f"decode (batch {args.batch}, one new token per sequence):", flush=True)
        payload["decode"] = gpu_decode([32768, 65536, 131072], args.batch)
        path = write_result(args.out or "sparse_attention_gpu", payload)
    else:
        torch.set_num_threads(args.threads)
        contexts = args.contexts or [8192, 32768, 65536]
        print(f"CPU decode attention per token and layer, {args.threads} threads, float32:", flush=True)
        rows = cpu_decode(contexts, args.layers, args.steps, warmup=3)
        payload = {"machine": machine_info(args.threads), "sparse": SPARSE.to_dict(), "dtype": "float32",
                   "shapes": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "batch": 1,
                              "kv_block_size": 16, "layers_per_step": args.layers},
                   "decode": rows}  # fmt: skip
        path = write_result(args.out or "sparse_attention_cpu", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
