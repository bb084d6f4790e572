"""Fixtures for the InfLLM v2 kernel tests: random packed/paged inputs and naive oracles."""

from __future__ import annotations

import math

import pytest
import torch

from rlcpm.kernels.infllm_v2 import InfLLMv2Config, KeyLayout


@pytest.fixture(autouse=True)
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def small_config():
    """small_config(**overrides): kernel 8 / stride 4 / block 16, k_eff 5 (init, local, own block +
    2 chosen by score), so sparsity shows at ~100 tokens."""

    def make(**overrides) -> InfLLMv2Config:
        values = dict(
            kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=16, topk=4, dense_len=-1
        )
        values.update(overrides)
        return InfLLMv2Config(**values)

    return make


@pytest.fixture
def packed_inputs():
    """packed_inputs(lengths, heads, kv_heads, head_dim, dtype, seed) -> (q, k, v, cu_seqlens)."""

    def make(lengths, heads=4, kv_heads=2, head_dim=16, dtype=torch.float32, seed=0):
        gen = torch.Generator().manual_seed(seed)
        total = sum(lengths)
        q = torch.randn(total, heads, head_dim, generator=gen).to(dtype)
        k = torch.randn(total, kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(total, kv_heads, head_dim, generator=gen).to(dtype)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
        return q, k, v, cu

    return make


@pytest.fixture
def paged_copy():
    """paged_copy(k, v, cu, page_size, seed) -> (k_cache, v_cache, layout): the packed sequences
    scattered over shuffled pages of a cache (with spare pages)."""

    def make(k, v, cu, page_size, seed=0):
        lengths = (cu[1:] - cu[:-1]).tolist()
        pages = [math.ceil(n / page_size) for n in lengths]
        num_pages = sum(pages) + 3
        order = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed))
        tables = torch.full((len(lengths), max(pages)), -1, dtype=torch.int32)
        k_cache = torch.zeros(num_pages * page_size, *k.shape[1:], dtype=k.dtype)
        v_cache = torch.zeros_like(k_cache)
        used = 0
        for s, (n, p) in enumerate(zip(lengths, pages)):
            tables[s, :p] = order[used : used + p].to(torch.int32)
            used += p
            pos = torch.arange(n)
            slots = tables[s, pos // page_size].long() * page_size + pos % page_size
            k_cache[slots] = k[cu[s] : cu[s + 1]]
            v_cache[slots] = v[cu[s] : cu[s + 1]]
        return k_cache, v_cache, KeyLayout.paged(tables, page_size)

    return make


@pytest.fixture
def block_mask_attention():
    """block_mask_attention(q, k, v, cu, q_seq, q_pos, block_idx, block_size) -> out [Tq, Hq, D]:
    the oracle of stage 2, an ordinary masked softmax over each query's whole sequence with the
    mask built from the block indices (key allowed iff its block is selected and pos <= q_pos),
    in float64 and differentiable."""

    def run(q, k, v, cu, q_seq, q_pos, block_idx, block_size):
        num_q, heads, dim = q.shape
        kv_heads = k.shape[1]
        group = heads // kv_heads
        outs = []
        for s in range(cu.numel() - 1):
            rows = (q_seq == s).nonzero().squeeze(1)
            keys, values = k[cu[s] : cu[s + 1]].double(), v[cu[s] : cu[s + 1]].double()
            key_block = torch.arange(keys.shape[0]) // block_size  # [L]
            selected = (block_idx[rows].long()[..., None] == key_block).any(dim=2)  # [n, Hkv, L]
            allowed = selected & (torch.arange(keys.shape[0]) <= q_pos[rows][:, None, None])
            allowed = allowed.repeat_interleave(group, dim=1)  # [n, Hq, L]
            keys_q = keys.repeat_interleave(group, dim=1)  # [L, Hq, D]
            values_q = values.repeat_interleave(group, dim=1)
            scores = torch.einsum("nhd,lhd->nhl", q[rows].double(), keys_q) / math.sqrt(dim)
            probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
            outs.append((rows, torch.einsum("nhl,lhd->nhd", probs, values_q)))
        out = torch.zeros(num_q, heads, dim, dtype=torch.float64)
        for rows, value in outs:
            out = out.index_copy(0, rows, value)
        return out

    return run
