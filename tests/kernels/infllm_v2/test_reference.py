"""SPECS §2 invariants of the InfLLM v2 PyTorch references (CPU, no Triton)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rlcpm.config import SparseAttentionConfig
from rlcpm.errors import UnsupportedModelError
from rlcpm.kernels.infllm_v2 import (
    InfLLMv2Config,
    KeyLayout,
    PagedCompressedKeys,
    block_sparse_attention,
    block_sparse_attn,
    compress_keys,
    infllm_v2_attention,
    kernel_scores_reference,
    mean_pool_windows,
    select_blocks,
    sparse_decode_attention,
    topk_blocks,
)
from rlcpm.kernels.infllm_v2.functional import packed_queries
from rlcpm.kernels.infllm_v2.stage1 import pool_block_scores
from rlcpm.models.kv_cache import PagedKVCache
from rlcpm.models.metadata import AttentionMetadata

# ---------------------------------------------------------------------------------- config


def test_defaults_are_minicpm4_sparse_config():
    cfg = InfLLMv2Config()
    assert (cfg.kernel_size, cfg.kernel_stride, cfg.block_size) == (32, 16, 64)
    assert (cfg.init_blocks, cfg.window_size, cfg.topk, cfg.dense_len, cfg.use_nope) == (
        1,
        2048,
        64,
        8192,
        False,
    )
    assert (cfg.coarse_kernel_size, cfg.coarse_kernel_stride) == (128, 64)
    assert cfg.local_blocks == 32 and cfg.num_selected == 96 and cfg.pool_ratio == 4
    # Query i sees i + 1 keys: dense iff i + 1 < dense_len; dense_len -1 is never dense.
    assert cfg.is_dense_query(8190) and not cfg.is_dense_query(8191)
    assert not InfLLMv2Config(dense_len=-1).is_dense_query(0)
    # The recipe section and a checkpoint's sparse_config (extra keys ignored) give the same settings.
    assert InfLLMv2Config.from_dict(SparseAttentionConfig().model_dump()) == cfg
    minicpm4 = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64, "window_size": 2048,
                "topk": 64, "use_nope": False, "dense_len": 8192, "extra_key": 3}  # fmt: skip
    assert InfLLMv2Config.from_dict(minicpm4) == cfg and InfLLMv2Config.from_dict(None) == cfg


@pytest.mark.parametrize(
    "values, message",
    [
        ({"block_size": 60}, "block_size \\(60\\) must be a multiple of kernel_stride \\(16\\)"),
        ({"window_size": 100}, "window_size \\(100\\) must be a multiple of block_size"),
        ({"topk": 1, "init_blocks": 1}, "topk \\(1\\) must be >= init_blocks \\+ 1"),
        ({"use_nope": True}, "use_nope=true"),
        ({"kernel_size": 0}, "kernel_size must be > 0"),
    ],
)
def test_bad_config_names_the_key(values, message):
    with pytest.raises(UnsupportedModelError, match=message):
        InfLLMv2Config.from_dict(values)


# ----------------------------------------------------------------------------- compression


@pytest.mark.parametrize("kernel, stride", [(8, 4), (32, 16), (128, 64)])
def test_batch_compression_is_the_mean_of_each_full_window(packed_inputs, kernel, stride):
    _, k, _, cu = packed_inputs([150, 31, 7, 140])
    kc, cu_c = compress_keys(k, cu, kernel, stride)
    expected, counts = [], []
    for s in range(4):
        keys = k[cu[s] : cu[s + 1]]
        windows = [keys[j : j + kernel].mean(0) for j in range(0, keys.shape[0] - kernel + 1, stride)]
        counts.append(len(windows))
        expected += windows
    assert cu_c.tolist() == [0, *torch.tensor(counts).cumsum(0).tolist()]
    assert counts[2] == 0 and (kernel > 31 or counts[1] == (31 - kernel) // stride + 1)
    if expected:
        torch.testing.assert_close(kc, torch.stack(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("page_size, config", [(8, "small"), (16, "small"), (16, "default")])
def test_incremental_compression_equals_batch_compression(packed_inputs, small_config, page_size, config):
    """Keys arrive like in the engine (prefill chunks, then one token per step, two sequences);
    after every step the paged compressed keys equal batch compression of the keys so far."""
    cfg = small_config() if config == "small" else InfLLMv2Config()
    lengths = [330, 200] if config == "default" else [120, 75]
    _, k, _, cu = packed_inputs(lengths, kv_heads=2, head_dim=8)
    pages_per_seq = [math.ceil(n / page_size) for n in lengths]
    cache = PagedKVCache(1, sum(pages_per_seq) + 2, page_size, 2, 8)
    order = torch.randperm(cache.num_blocks, generator=torch.Generator().manual_seed(1)).tolist()
    tables = [order[: pages_per_seq[0]], order[pages_per_seq[0] : sum(pages_per_seq)]]
    tiers = [
        PagedCompressedKeys(cache, cfg.kernel_size, cfg.kernel_stride),
        PagedCompressedKeys(cache, cfg.coarse_kernel_size, cfg.coarse_kernel_stride),
    ]
    # Step sizes per sequence: a chunked prefill, then decode steps of one token.
    plans = [[37, 40] + [1] * (lengths[0] - 77), [50] + [1] * (lengths[1] - 50)]
    done = [0, 0]
    for step in range(max(len(p) for p in plans)):
        seqs = [s for s in range(2) if step < len(plans[s])]
        new = [plans[s][step] for s in seqs]
        ctx = [done[s] + n for s, n in zip(seqs, new)]
        meta = AttentionMetadata.paged(new, ctx, [tables[s] for s in seqs], page_size)
        keys = torch.cat([k[cu[s] + done[s] : cu[s] + c] for s, c in zip(seqs, ctx)])
        cache.write(0, keys, keys, meta.slot_mapping)
        for tier in tiers:
            plan = tier.plan(meta.block_tables, meta.context_lens, meta.seq_lens_q)
            tier.update(0, cache.flat(0)[0], plan, mean_pool_windows)
            got, got_cu = tier.gather(0, plan)
            prefix = torch.cat([k[cu[s] : cu[s] + c] for s, c in zip(seqs, ctx)])
            prefix_cu = torch.tensor([0, *torch.tensor(ctx).cumsum(0).tolist()], dtype=torch.int32)
            want, want_cu = compress_keys(prefix, prefix_cu, tier.kernel_size, tier.kernel_stride)
            assert torch.equal(got_cu, want_cu)
            assert torch.equal(got, want), f"step {step}, kernel {tier.kernel_size}"
        for s, c in zip(seqs, ctx):
            done[s] = c


# --------------------------------------------------------------------------------- stage 1


def _naive_kernel_scores(q, q_seq, q_pos, kc1, cu1, kc2, cu2, cfg, scale):
    """Per query, per head: a plain softmax (exact) or exp(s - lse over coarse keys), visibility
    rule spelled out, summed over the group."""
    num_q, heads, _ = q.shape
    kv_heads = kc1.shape[1]
    group = heads // kv_heads
    width = int((cu1[1:] - cu1[:-1]).max())
    out = torch.zeros(num_q, kv_heads, width, dtype=torch.float64)
    for t in range(num_q):
        s, i = int(q_seq[t]), int(q_pos[t])
        fine = kc1[cu1[s] : cu1[s + 1]].double()
        coarse = kc2[cu2[s] : cu2[s + 1]].double()
        vis1 = [j for j in range(fine.shape[0]) if cfg.kernel_stride * j + cfg.kernel_size - 1 <= i]
        vis2 = [
            j
            for j in range(coarse.shape[0])
            if cfg.coarse_kernel_stride * j + cfg.coarse_kernel_size - 1 <= i
        ]
        for h in range(kv_heads):
            for g in range(group):
                qh = q[t, h * group + g].double()
                scores = fine[vis1, h] @ qh * scale
                if cfg.lse_approx:
                    if not vis2:
                        continue  # no coarse kernel visible: p = 0
                    probs = torch.exp(scores - torch.logsumexp(coarse[vis2, h] @ qh * scale, 0))
                elif vis1:
                    probs = torch.softmax(scores, 0)
                else:
                    continue
                out[t, h, vis1] += probs
    return out


@pytest.mark.parametrize("lse_approx", [True, False])
@pytest.mark.parametrize("heads", [2, 8])
def test_stage1_equals_naive_per_head_softmax_summed_over_group(
    packed_inputs, small_config, lse_approx, heads
):
    cfg = small_config(lse_approx=lse_approx)
    q, k, _, cu = packed_inputs([90, 45], heads=heads, kv_heads=2)
    kc1, cu1 = compress_keys(k, cu, cfg.kernel_size, cfg.kernel_stride)
    kc2, cu2 = compress_keys(k, cu, cfg.coarse_kernel_size, cfg.coarse_kernel_stride)
    q_seq, q_pos = packed_queries(cu)
    scale = 16**-0.5
    got = kernel_scores_reference(q, q_seq, q_pos, kc1, cu1, kc2, cu2, cfg, scale)
    want = _naive_kernel_scores(q, q_seq, q_pos, kc1, cu1, kc2, cu2, cfg, scale)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    if not lse_approx:  # a true softmax: each head's visible probabilities sum to 1
        visible_rows = q_pos >= cfg.kernel_size - 1
        sums = got.sum(-1)[visible_rows]
        torch.testing.assert_close(sums, torch.full_like(sums, heads // 2))


@pytest.mark.parametrize("lengths", [[150], [150, 60, 97]])
def test_stage1_with_one_query_per_sequence_equals_the_naive_scores(packed_inputs, small_config, lengths):
    """The decode shape (each sequence's newest token, or any one token per sequence) takes a
    path without query padding; a query at its sequence's end sees every complete kernel."""
    cfg = small_config()
    q, k, _, cu = packed_inputs(lengths, heads=8, kv_heads=2)
    kc1, cu1 = compress_keys(k, cu, cfg.kernel_size, cfg.kernel_stride)
    kc2, cu2 = compress_keys(k, cu, cfg.coarse_kernel_size, cfg.coarse_kernel_stride)
    q_seq, q_pos = packed_queries(cu)
    scale = 16**-0.5
    last = cu[1:].long() - 1
    middle = cu[:-1].long() + (cu[1:] - cu[:-1]).long() // 2
    for rows in (last, middle):
        got = kernel_scores_reference(q[rows], q_seq[rows], q_pos[rows], kc1, cu1, kc2, cu2, cfg, scale)
        want = _naive_kernel_scores(q[rows], q_seq[rows], q_pos[rows], kc1, cu1, kc2, cu2, cfg, scale)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        assert (got > 0).any()


def test_block_pooling_window_and_forced_blocks(small_config):
    """Block b pools kernels 4b-1 .. 4b+3; init, local and own blocks +inf; later blocks -inf."""
    cfg = small_config(window_size=32, topk=3)  # local_blocks 2, ratio 4
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 2, 40, generator=gen)
    q_pos = torch.tensor([5, 100, 150])
    num_blocks = 10
    got = pool_block_scores(scores, q_pos, num_blocks, cfg)
    for t in range(3):
        qb = int(q_pos[t]) // cfg.block_size
        for b in range(num_blocks):
            if b < 1 or qb - 2 <= b <= qb:
                want = torch.full((2,), float("inf"))
            elif b > qb:
                want = torch.full((2,), float("-inf"))
            else:
                want = scores[t, :, max(0, 4 * b - 1) : 4 * b + 4].amax(-1)
            assert torch.equal(got[t, :, b], want), (t, b)


# ------------------------------------------------------------------------------- selection


def test_selection_keeps_init_and_local_blocks_and_never_a_future_block(packed_inputs, small_config):
    cfg = small_config(window_size=32, topk=3)  # k_eff = 5: 1 init + 2 dynamic + 2 local + own
    q, k, _, cu = packed_inputs([230, 61], heads=4, kv_heads=2)
    kc1, cu1 = compress_keys(k, cu, cfg.kernel_size, cfg.kernel_stride)
    kc2, cu2 = compress_keys(k, cu, cfg.coarse_kernel_size, cfg.coarse_kernel_stride)
    q_seq, q_pos = packed_queries(cu)
    idx = select_blocks(q, q_seq, q_pos, kc1, cu1, kc2, cu2, cfg, 0.25)
    assert idx.shape == (q.shape[0], 2, 5) and idx.dtype == torch.int32
    num_sparse = 0
    for t in range(q.shape[0]):
        qb = int(q_pos[t]) // 16
        for h in range(2):
            row = idx[t, h].tolist()
            valid = [b for b in row if b >= 0]
            assert row == valid + [-1] * (5 - len(valid)) and valid == sorted(set(valid))
            assert len(valid) == min(5, qb + 1) and max(valid) <= qb
            assert {0, *range(max(0, qb - 2), qb + 1)} <= set(valid)
            num_sparse += qb + 1 > 5
    assert num_sparse > 100  # the selection really drops blocks here


def test_topk_breaks_ties_toward_the_lower_block_and_drops_future_blocks(small_config):
    cfg = small_config(topk=3, window_size=0)  # k_eff = 3
    inf = float("inf")
    scores = torch.tensor(
        [[[inf, 0.5, 0.7, 0.5, 0.5, inf, -inf, -inf]], [[inf, 0.0, 0.0, 0.0, inf, -inf, -inf, -inf]]]
    )
    assert topk_blocks(scores, cfg).tolist() == [[[0, 2, 5]], [[0, 1, 4]]]
    few = torch.tensor([[[inf, inf, -inf, -inf]]])
    assert topk_blocks(few, cfg).tolist() == [[[0, 1, -1]]]


# --------------------------------------------------------------------------------- stage 2


@pytest.mark.parametrize("heads", [2, 8])
def test_stage2_equals_masked_softmax_from_the_block_mask(
    packed_inputs, small_config, block_mask_attention, heads
):
    cfg = small_config(window_size=16, topk=2)
    q, k, v, cu = packed_inputs([100, 37], heads=heads, kv_heads=2)
    q_seq, q_pos = packed_queries(cu)
    kc1, cu1 = compress_keys(k, cu, cfg.kernel_size, cfg.kernel_stride)
    kc2, cu2 = compress_keys(k, cu, cfg.coarse_kernel_size, cfg.coarse_kernel_stride)
    idx = select_blocks(q, q_seq, q_pos, kc1, cu1, kc2, cu2, cfg, 0.25)
    q, k, v = (x.double().requires_grad_() for x in (q, k, v))
    got = block_sparse_attention.reference(q, k, v, KeyLayout.packed(cu), q_seq, q_pos, idx, 16, 0.25)
    want = block_mask_attention(q, k, v, cu, q_seq, q_pos, idx, 16)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    for name, a, b in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"d{name}")
    # And the mask really is sparse: dense causal attention differs.
    dense = block_mask_attention(q, k, v, cu, q_seq, q_pos, torch.arange(7).expand(q.shape[0], 2, 7), 16)
    assert (dense - want).abs().max() > 1e-2


@pytest.mark.parametrize("piece_keys", [24, 64])  # several pieces, the last one padded (24)
def test_stage2_two_pass_softmax_over_several_pieces_equals_the_block_mask_oracle(
    packed_inputs, small_config, block_mask_attention, paged_copy, monkeypatch, piece_keys
):
    monkeypatch.setattr(block_sparse_attn, "_PIECE_KEYS", piece_keys)
    cfg = small_config(window_size=32, topk=3)  # k_eff 6 blocks of 16 = 96 keys per query
    q, k, v, cu = packed_inputs([130, 75], heads=8, kv_heads=2)
    q_seq, q_pos = packed_queries(cu)
    kc1, cu1 = compress_keys(k, cu, cfg.kernel_size, cfg.kernel_stride)
    kc2, cu2 = compress_keys(k, cu, cfg.coarse_kernel_size, cfg.coarse_kernel_stride)
    idx = select_blocks(q, q_seq, q_pos, kc1, cu1, kc2, cu2, cfg, 0.25)
    assert idx.shape[-1] * 16 > piece_keys
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    got = block_sparse_attention.reference(q64, k64, v64, KeyLayout.packed(cu), q_seq, q_pos, idx, 16, 0.25)
    want = block_mask_attention(q64, k64, v64, cu, q_seq, q_pos, idx, 16)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(want)
    for name, a, b in zip(
        "qkv",
        torch.autograd.grad(got, (q64, k64, v64), grad),
        torch.autograd.grad(want, (q64, k64, v64), grad),
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"d{name}")
    # The in-place inference path (scratch buffers) runs the same pieces: bitwise the same.
    tracked = block_sparse_attention.reference(
        q, k.requires_grad_(), v, KeyLayout.packed(cu), q_seq, q_pos, idx, 16, 0.25
    )
    k_cache, v_cache, layout = paged_copy(k.detach(), v, cu, page_size=8)
    last = cu[1:].long() - 1
    with torch.no_grad():
        decoded = sparse_decode_attention(q[last], k_cache, v_cache, layout, q_pos[last], idx[last], 16, 0.25)
    torch.testing.assert_close(decoded, tracked.detach()[last], rtol=0, atol=0)


def test_paged_stage2_and_decode_equal_packed(packed_inputs, small_config, paged_copy):
    cfg = small_config()
    q, k, v, cu = packed_inputs([100, 37, 64], heads=4, kv_heads=2)
    q_seq, q_pos = packed_queries(cu)
    kc1, cu1 = compress_keys(k, cu, cfg.kernel_size, cfg.kernel_stride)
    kc2, cu2 = compress_keys(k, cu, cfg.coarse_kernel_size, cfg.coarse_kernel_stride)
    idx = select_blocks(q, q_seq, q_pos, kc1, cu1, kc2, cu2, cfg, 0.25)
    packed = block_sparse_attention(q, k, v, KeyLayout.packed(cu), q_seq, q_pos, idx, 16, 0.25)
    k_cache, v_cache, layout = paged_copy(k, v, cu, page_size=8)
    paged = block_sparse_attention(q, k_cache, v_cache, layout, q_seq, q_pos, idx, 16, 0.25)
    torch.testing.assert_close(paged, packed, rtol=0, atol=0)
    last = cu[1:].long() - 1
    decoded = sparse_decode_attention(q[last], k_cache, v_cache, layout, q_pos[last], idx[last], 16, 0.25)
    torch.testing.assert_close(decoded, packed[last], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stage2_inference_on_scratch_buffers_equals_the_tracked_path(packed_inputs, small_config, dtype):
    cfg = small_config()
    q, k, v, cu = packed_inputs([100, 37], heads=4, kv_heads=2, dtype=dtype)
    q_seq, q_pos = packed_queries(cu)
    kc1, cu1 = compress_keys(k, cu, cfg.kernel_size, cfg.kernel_stride)
    kc2, cu2 = compress_keys(k, cu, cfg.coarse_kernel_size, cfg.coarse_kernel_stride)
    idx = select_blocks(q, q_seq, q_pos, kc1, cu1, kc2, cu2, cfg, 0.25)
    args = (KeyLayout.packed(cu), q_seq, q_pos, idx, 16, 0.25)
    tracked = block_sparse_attention.reference(q, k.requires_grad_(), v, *args)  # no scratch
    with torch.no_grad():
        first = block_sparse_attention.reference(q, k, v, *args)
        second = block_sparse_attention.reference(q.flip(0), k, v, *args)  # reuses the buffers
    torch.testing.assert_close(first, tracked.detach(), rtol=0, atol=0)
    assert (first - second).abs().max() > 0  # the first result is its own memory, not a scratch view


def test_sparse_equals_dense_causal_when_the_selection_covers_every_block(packed_inputs, small_config):
    cfg = small_config(topk=20)  # k_eff = 21 >= 7 blocks of the 100-token sequence
    q, k, v, cu = packed_inputs([100, 37], heads=4, kv_heads=2)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    got = infllm_v2_attention(q, k, v, cu, cfg)
    want = torch.cat(
        [
            F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1),
                k[a:b].transpose(0, 1),
                v[a:b].transpose(0, 1),
                is_causal=True,
                enable_gqa=True,
            ).transpose(0, 1)
            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())
        ]
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
