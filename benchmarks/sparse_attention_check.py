"""Self-check of the InfLLM v2 Triton kernels on CUDA: each kernel against its PyTorch reference on
small MiniCPM4-shaped inputs (GQA groups 1/4/16, float32 and bfloat16, packed and paged keys),
max relative errors printed. Run by `python -m benchmarks.sparse_attention --gpu [--check-only]`
before anything is timed.
"""

from __future__ import annotations

import torch

from rlcpm.kernels.infllm_v2 import InfLLMv2Config

DEVICE = "cuda"  # a CPU dry run under TRITON_INTERPRET=1 sets "cpu"


def packed_inputs(lengths, heads, kv_heads, dim, dtype, seed=0, device=None):
    """Random packed q [T, heads, dim], k/v [T, kv_heads, dim] and cu_seqlens on `device`."""
    device = device or DEVICE
    gen = torch.Generator(device=device).manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, heads, dim, device=device, dtype=dtype, generator=gen)
    k = torch.randn(total, kv_heads, dim, device=device, dtype=dtype, generator=gen)
    v = torch.randn(total, kv_heads, dim, device=device, dtype=dtype, generator=gen)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(torch.tensor(lengths, device=device), 0)
    return q, k, v, cu


def gpu_check(lengths: tuple[int, ...] = (1000, 333, 517)) -> tuple[bool, list[dict]]:
    """Every kernel vs its reference on CUDA tensors; returns (all within tolerance, rows)."""
    from rlcpm.kernels.infllm_v2 import (
        KeyLayout,
        block_scores,
        block_sparse_attention,
        compress_keys,
        mean_pool_windows,
        select_blocks,
        sparse_decode_attention,
    )
    from rlcpm.kernels.infllm_v2.functional import packed_queries

    rows = []

    def record(name, got, want, tol):
        got, want = got.detach().float(), want.detach().float()
        finite = torch.isfinite(want)
        same_inf = bool(torch.equal(got[~finite], want[~finite]))
        diff, scale = (got[finite] - want[finite]).abs(), want[finite].abs()
        err = float(diff.max() / scale.max().clamp(min=1e-6)) if diff.numel() else 0.0
        rows.append({"check": name, "max_rel_error": err, "ok": same_inf and err < tol})
        print(f"  {name:<48} max rel error {err:.2e}  {'ok' if rows[-1]['ok'] else 'FAILED'}", flush=True)

    for heads, dtype, lse_approx in [
        (32, torch.bfloat16, True),
        (2, torch.float32, False),
        (8, torch.bfloat16, True),
    ]:
        cfg = InfLLMv2Config(window_size=128, topk=4, dense_len=-1, lse_approx=lse_approx)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        tag = f"G={heads // 2} {str(dtype).removeprefix('torch.')}"
        q, k, v, cu = packed_inputs(list(lengths), heads, 2, 128, dtype)
        q_seq, q_pos = packed_queries(cu)
        kc1, cu1 = compress_keys(k, cu, 32, 16, pool=mean_pool_windows.kernel)
        ref1, _ = compress_keys(k, cu, 32, 16, pool=mean_pool_windows.reference)
        record(f"mean_pool_windows {tag}", kc1, ref1, tol)
        kc2, cu2 = compress_keys(k, cu, 128, 64, pool=mean_pool_windows.reference)
        args = (q, q_seq, q_pos, kc1, cu1, kc2, cu2, int(q_pos.max()) // 64 + 1, cfg, 128**-0.5)
        record(
            f"block_scores {tag} lse_approx={lse_approx}",
            block_scores.kernel(*args),
            block_scores.reference(*args),
            tol,
        )
        idx = select_blocks(
            q, q_seq, q_pos, kc1, cu1, kc2, cu2, cfg, 128**-0.5, block_scores=block_scores.reference
        )
        layout = KeyLayout.packed(cu)
        qk, kk, vk = (x.clone().requires_grad_() for x in (q, k, v))
        qr, kr, vr = (x.float().requires_grad_() for x in (q, k, v))
        got = block_sparse_attention.kernel(qk, kk, vk, layout, q_seq, q_pos, idx, 64, 128**-0.5)
        want = block_sparse_attention.reference(qr, kr, vr, layout, q_seq, q_pos, idx, 64, 128**-0.5)
        record(f"block_sparse_attention fwd {tag}", got, want, tol)
        grad = torch.randn_like(want)
        for name, a, b in zip("qkv", torch.autograd.grad(got, (qk, kk, vk), grad.to(dtype)),
                              torch.autograd.grad(want, (qr, kr, vr), grad)):  # fmt: skip
            record(f"block_sparse_attention d{name} {tag}", a, b, tol)
        # Paged decode: sequences scattered over shuffled 64-token pages.
        page = 64
        seq_lens = (cu[1:] - cu[:-1]).tolist()
        pages = [-(-n // page) for n in seq_lens]
        order = torch.randperm(sum(pages), device=DEVICE)
        tables = torch.full((len(seq_lens), max(pages)), 0, dtype=torch.int32, device=DEVICE)
        k_cache = torch.zeros(sum(pages) * page, 2, 128, device=DEVICE, dtype=dtype)
        v_cache = torch.zeros_like(k_cache)
        used = 0
        for s, (n, p) in enumerate(zip(seq_lens, pages)):
            tables[s, :p] = order[used : used + p].to(torch.int32)
            used += p
            pos = torch.arange(n, device=DEVICE)
            slots = tables[s, pos // page].long() * page + pos % page
            k_cache[slots], v_cache[slots] = k[cu[s] : cu[s + 1]], v[cu[s] : cu[s + 1]]
        last = cu[1:].long() - 1
        paged = KeyLayout.paged(tables, page)
        args = (k_cache, v_cache, paged, q_pos[last], idx[last], 64, 128**-0.5)
        record(
            f"sparse_decode_attention {tag}",
            sparse_decode_attention.kernel(q[last], *args),
            sparse_decode_attention.reference(q[last].float(), k_cache.float(), v_cache.float(), *args[2:]),
            tol,
        )
    return all(r["ok"] for r in rows), rows
