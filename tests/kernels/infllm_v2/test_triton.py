"""InfLLM v2 Triton kernels under TRITON_INTERPRET=1 against their PyTorch references.

Shapes cover GQA groups 1/2/4/16, lengths that are not multiples of 64, several sequences,
float32 and bfloat16, packed and paged keys, and the split-KV decode path.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported: Triton's CPU interpreter

import pytest  # noqa: E402
import torch  # noqa: E402

from rlcpm.errors import RlcpmError  # noqa: E402
from rlcpm.kernels.dispatch import KernelOp, use_triton  # noqa: E402
from rlcpm.kernels.infllm_v2 import (  # noqa: E402
    InfLLMv2Config,
    KeyLayout,
    block_scores,
    block_sparse_attention,
    compress_keys,
    mean_pool_windows,
    select_blocks,
    sparse_decode_attention,
    topk_blocks,
)
from rlcpm.kernels.infllm_v2.functional import packed_queries  # noqa: E402

BLOCK64 = dict(
    kernel_size=32, kernel_stride=16, block_size=64, init_blocks=1, window_size=64, topk=2, dense_len=-1
)


def _close(got, want, dtype, what):
    """float32: tight; bfloat16: within 2% of the largest magnitude (the kernels round p to bf16)."""
    got, want = got.float(), want.float()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=what)
    else:
        err = (got - want).abs().max() / want.abs().max().clamp(min=1e-6)
        assert err < 2e-2, f"{what}: relative error {err:.3g}"


def _compressed(k, cu, cfg):
    kc1, cu1 = compress_keys(k, cu, cfg.kernel_size, cfg.kernel_stride, pool=mean_pool_windows.reference)
    kc2, cu2 = compress_keys(
        k, cu, cfg.coarse_kernel_size, cfg.coarse_kernel_stride, pool=mean_pool_windows.reference
    )
    return kc1, cu1, kc2, cu2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mean_pool_windows_kernel(packed_inputs, dtype):
    _, k, _, cu = packed_inputs([200, 77, 9], kv_heads=2, head_dim=24, dtype=dtype)
    for kernel, stride in [(32, 16), (128, 64), (8, 4)]:
        got, got_cu = compress_keys(k, cu, kernel, stride, pool=mean_pool_windows.kernel)
        want, want_cu = compress_keys(k, cu, kernel, stride, pool=mean_pool_windows.reference)
        assert torch.equal(got_cu, want_cu) and got.dtype == dtype
        torch.testing.assert_close(
            got.float(), want.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6
        )


@pytest.mark.parametrize(
    "heads, lse_approx, dtype, block64",
    [
        (2, True, torch.float32, True),  # group 1
        (4, False, torch.float32, False),  # group 2, exact softmax
        (8, True, torch.bfloat16, True),  # group 4
        (32, True, torch.bfloat16, False),  # group 16
        (32, False, torch.float32, False),
    ],
)
def test_block_scores_kernel(packed_inputs, small_config, heads, lse_approx, dtype, block64):
    cfg = InfLLMv2Config(**BLOCK64, lse_approx=lse_approx) if block64 else small_config(lse_approx=lse_approx)
    lengths = [300, 77] if block64 else [100, 37, 21]
    q, k, _, cu = packed_inputs(lengths, heads=heads, kv_heads=2, dtype=dtype)
    kc1, cu1, kc2, cu2 = _compressed(k, cu, cfg)
    q_seq, q_pos = packed_queries(cu)
    num_blocks = int(q_pos.max()) // cfg.block_size + 1
    args = (q, q_seq, q_pos, kc1, cu1, kc2, cu2, num_blocks, cfg, 16**-0.5)
    got, want = block_scores.kernel(*args), block_scores.reference(*args)
    finite = torch.isfinite(want)
    assert torch.equal(got[~finite], want[~finite])  # forced (+inf) and future (-inf) blocks
    assert finite.sum() > 50
    torch.testing.assert_close(
        got[finite], want[finite], rtol=1e-4 if dtype == torch.float32 else 1e-3, atol=1e-6
    )
    if dtype == torch.float32:
        assert torch.equal(topk_blocks(got, cfg), topk_blocks(want, cfg))


def test_block_scores_kernel_never_forces_a_future_init_block(packed_inputs, small_config):
    """With init_blocks > 1, a query in block 0 must not score the init blocks after its own
    (future: -inf, as in the reference), so no selected index exceeds its block."""
    cfg = small_config(init_blocks=3, window_size=0)
    q, k, _, cu = packed_inputs([70, 5])
    kc1, cu1, kc2, cu2 = _compressed(k, cu, cfg)
    q_seq, q_pos = packed_queries(cu)
    args = (q, q_seq, q_pos, kc1, cu1, kc2, cu2, 5, cfg, 0.25)
    got, want = block_scores.kernel(*args), block_scores.reference(*args)
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.equal(got > 0, want > 0)
    idx = topk_blocks(got, cfg)
    assert (idx.long() <= (q_pos // cfg.block_size)[:, None, None]).all()


@pytest.mark.parametrize(
    "heads, dtype, block64",
    [
        (2, torch.bfloat16, False),  # group 1
        (4, torch.float32, True),  # group 2
        (8, torch.bfloat16, True),  # group 4
        (32, torch.float32, False),  # group 16
    ],
)
def test_block_sparse_attention_kernel_forward_and_backward(
    packed_inputs, small_config, heads, dtype, block64
):
    cfg = InfLLMv2Config(**BLOCK64) if block64 else small_config()
    lengths = [200, 77] if block64 else [100, 37 if heads < 32 else 21]
    q, k, v, cu = packed_inputs(lengths, heads=heads, kv_heads=2, dtype=dtype)
    q_seq, q_pos = packed_queries(cu)
    idx = select_blocks(
        q, q_seq, q_pos, *_compressed(k, cu, cfg), cfg, 0.25, block_scores=block_scores.reference
    )
    assert (idx < 0).any()  # some queries really skip blocks
    layout = KeyLayout.packed(cu)
    qk, kk, vk = (x.clone().requires_grad_() for x in (q, k, v))
    qr, kr, vr = (x.float().requires_grad_() for x in (q, k, v))
    got = block_sparse_attention.kernel(qk, kk, vk, layout, q_seq, q_pos, idx, cfg.block_size, 0.25)
    want = block_sparse_attention.reference(qr, kr, vr, layout, q_seq, q_pos, idx, cfg.block_size, 0.25)
    assert got.dtype == dtype
    _close(got, want, dtype, "out")
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(3))
    got_grads = torch.autograd.grad(got, (qk, kk, vk), grad.to(dtype))
    want_grads = torch.autograd.grad(want, (qr, kr, vr), grad)
    for name, a, b in zip("qkv", got_grads, want_grads):
        assert a.dtype == dtype
        _close(a, b, dtype, f"d{name}")


@pytest.mark.parametrize("heads, dtype", [(4, torch.float32), (32, torch.bfloat16)])
def test_block_sparse_attention_kernel_over_a_paged_cache(packed_inputs, paged_copy, heads, dtype):
    """Chunked prefill: the last 40 tokens of each sequence query keys in shuffled pages."""
    cfg = InfLLMv2Config(**BLOCK64)
    q, k, v, cu = packed_inputs([230, 150], heads=heads, kv_heads=2, dtype=dtype)
    q_seq, q_pos = packed_queries(cu)
    rows = torch.cat([torch.arange(b - 40, b) for b in cu[1:].tolist()])
    idx = select_blocks(
        q[rows],
        q_seq[rows],
        q_pos[rows],
        *_compressed(k, cu, cfg),
        cfg,
        0.25,
        block_scores=block_scores.reference,
    )
    k_cache, v_cache, layout = paged_copy(k, v, cu, page_size=16)
    args = (k_cache, v_cache, layout, q_seq[rows], q_pos[rows], idx, 64, 0.25)
    got = block_sparse_attention.kernel(q[rows], *args)
    want = block_sparse_attention.reference(q[rows].float(), k_cache.float(), v_cache.float(), *args[2:])
    _close(got, want, dtype, "paged out")


@pytest.mark.parametrize("heads, dtype", [(2, torch.float32), (8, torch.bfloat16), (32, torch.float32)])
def test_decode_kernel_splits_the_selected_blocks(packed_inputs, paged_copy, heads, dtype):
    cfg = InfLLMv2Config(**{**BLOCK64, "topk": 4})  # k_eff 5 -> 2 splits per sequence
    q, k, v, cu = packed_inputs([330, 77, 190], heads=heads, kv_heads=2, dtype=dtype)
    q_seq, q_pos = packed_queries(cu)
    last = cu[1:].long() - 1
    idx = select_blocks(
        q[last],
        q_seq[last],
        q_pos[last],
        *_compressed(k, cu, cfg),
        cfg,
        0.25,
        block_scores=block_scores.reference,
    )
    k_cache, v_cache, layout = paged_copy(k, v, cu, page_size=32)
    got = sparse_decode_attention.kernel(q[last], k_cache, v_cache, layout, q_pos[last], idx, 64, 0.25)
    want = sparse_decode_attention.reference(
        q[last].float(), k_cache.float(), v_cache.float(), layout, q_pos[last], idx, 64, 0.25
    )
    _close(got, want, dtype, "decode out")


def test_dispatch_picks_reference_on_cpu_and_obeys_rlcpm_kernels(monkeypatch):
    calls = []
    op = KernelOp("probe", lambda x: calls.append("reference"), "rlcpm.kernels.infllm_v2:block_scores")
    monkeypatch.delenv("RLCPM_KERNELS", raising=False)
    assert not use_triton(torch.device("cpu"))
    op(torch.zeros(1))
    assert calls == ["reference"]
    monkeypatch.setenv("RLCPM_KERNELS", "triton")
    assert use_triton(torch.device("cpu"))
    assert op.kernel is block_scores  # the kernel path resolves lazily
    monkeypatch.setenv("RLCPM_KERNELS", "reference")
    assert not use_triton(torch.device("cuda"))
    monkeypatch.setenv("RLCPM_KERNELS", "fast")
    with pytest.raises(RlcpmError, match="RLCPM_KERNELS='fast' is not one of"):
        use_triton(torch.device("cpu"))


def test_model_forward_through_the_kernels_equals_the_reference_path(monkeypatch, small_config):
    """The sparse backend routed to the Triton kernels (RLCPM_KERNELS=triton) computes what the
    reference path computes, forward and backward."""
    from rlcpm.models import AttentionMetadata
    from rlcpm.models.tiny import build_tiny_model, tiny_config

    sparse = small_config().to_dict()
    model = build_tiny_model(
        tiny_config("llama", vocab_size=96, num_hidden_layers=1, sparse_config=sparse, attention="sparse"),
        seed=0,
        init_std=0.1,
    )
    ids = torch.randint(0, 96, (120,), generator=torch.Generator().manual_seed(0))
    meta = AttentionMetadata.packed([80, 40])
    monkeypatch.setenv("RLCPM_KERNELS", "reference")
    want = model(ids, meta=meta)
    want_grad = torch.autograd.grad(want.square().mean(), model.model.layers[0].self_attn.k_proj.weight)[0]
    monkeypatch.setenv("RLCPM_KERNELS", "triton")
    got = model(ids, meta=AttentionMetadata.packed([80, 40]))
    got_grad = torch.autograd.grad(got.square().mean(), model.model.layers[0].self_attn.k_proj.weight)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-3, atol=1e-6)


def test_stage_2_kernels_refuse_a_block_size_that_is_not_a_power_of_two(packed_inputs, paged_copy):
    """InfLLMv2Config and the CPU reference take block_size 24; the kernels tile keys by block
    (tl.arange needs a power of two): a clear error naming the setting, not a Triton compile error."""
    cfg = InfLLMv2Config(kernel_size=24, kernel_stride=12, block_size=24, window_size=24, topk=2, dense_len=-1)
    q, k, v, cu = packed_inputs([60, 30])
    q_seq, q_pos = packed_queries(cu)
    idx = select_blocks(
        q, q_seq, q_pos, *_compressed(k, cu, cfg), cfg, 0.25, block_scores=block_scores.reference
    )
    with pytest.raises(RlcpmError, match="block_size \\(24\\) must be a power of two"):
        block_sparse_attention.kernel(q, k, v, KeyLayout.packed(cu), q_seq, q_pos, idx, 24, 0.25)
    k_cache, v_cache, layout = paged_copy(k, v, cu, 8)
    last = (cu[1:] - 1).long()
    with pytest.raises(RlcpmError, match="block_size \\(24\\) must be a power of two"):
        sparse_decode_attention.kernel(q[last], k_cache, v_cache, layout, q_pos[last], idx[last], 24, 0.25)
