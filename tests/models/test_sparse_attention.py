"""The `sparse` attention backend (InfLLM v2) inside the decoder: dense_len switch, equality with
dense attention when nothing is dropped, paged prefill/decode == packed forward, settings sources."""

from __future__ import annotations

import pytest
import torch

from rlcpm.errors import EngineError
from rlcpm.kernels.infllm_v2 import InfLLMv2Config
from rlcpm.models import AttentionMetadata, load_model
from rlcpm.models.kv_cache import PagedKVCache

SMALL = dict(
    kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=16, topk=4, dense_len=-1
)


def _pair(make_model, model_type="llama", **sparse):
    """(dense model, sparse model) with the same weights."""
    config = {**SMALL, **sparse}
    dense = make_model(model_type, sparse_config=config)
    model = make_model(model_type, sparse_config=config, attention="sparse")
    return dense, model


def test_below_dense_len_the_backend_is_dense_attention(make_model, random_ids):
    dense, sparse = _pair(make_model, dense_len=200)
    ids = random_ids(190)

    def prefill(model):  # one 120-token prefill through a paged cache
        cache = model.new_kv_cache(num_blocks=8, block_size=16)
        meta = AttentionMetadata.paged([120], [120], [list(range(8))], 16)
        return model(ids[:120], torch.arange(120), meta=meta, kv_cache=cache)

    with torch.no_grad():
        packed = [model(ids, meta=AttentionMetadata.packed([120, 70])) for model in (sparse, dense)]
        assert torch.equal(packed[0], packed[1])
        assert torch.equal(prefill(sparse), prefill(dense))


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "minicpm"])
def test_sparse_equals_dense_when_every_block_is_selected(make_model, random_ids, model_type):
    dense, sparse = _pair(make_model, model_type, topk=20)  # k_eff 21 >= 9 blocks
    ids = random_ids(140)
    meta = AttentionMetadata.packed([140])
    torch.testing.assert_close(sparse(ids, meta=meta), dense(ids, meta=meta), rtol=1e-5, atol=1e-5)
    _, sparser = _pair(make_model, model_type)  # topk 4: 5 of 9 blocks, outputs move
    assert (sparser(ids, meta=meta) - dense(ids, meta=meta)).abs().max() > 1e-3


def test_dense_len_switch_is_per_query(make_model, random_ids):
    """Query i attends densely iff i + 1 < dense_len, in a sequence of any length."""
    dense, sparse = _pair(make_model, dense_len=60)
    ids = random_ids(190)
    meta = AttentionMetadata.packed([120, 70])
    with torch.no_grad():
        got, want = sparse(ids, meta=meta), dense(ids, meta=meta)
    early = torch.cat([torch.arange(0, 59), torch.arange(120, 179)])
    late = torch.cat([torch.arange(59, 120), torch.arange(179, 190)])
    torch.testing.assert_close(got[early], want[early], rtol=1e-5, atol=1e-5)
    assert (got[late] - want[late]).abs().amax(-1).max() > 1e-3


@pytest.mark.parametrize("dense_len", [-1, 50])
def test_paged_prefill_chunks_and_decode_equal_the_packed_forward(make_model, random_ids, dense_len):
    """Two sequences through the paged cache (prefill chunks, then single tokens, mixed in one
    batch) give the logits of the packed training forward at every position."""
    _, model = _pair(make_model, dense_len=dense_len)
    lengths = [150, 90]
    ids = [random_ids(n, seed=s) for s, n in enumerate(lengths)]
    with torch.no_grad():
        want = model(torch.cat(ids), meta=AttentionMetadata.packed(lengths)).split(lengths)
        cache = model.new_kv_cache(num_blocks=20, block_size=16)
        tables = [list(range(0, 10)), list(range(10, 16))]
        schedule = [[40, 30], [35, 30]] + [[1, 1]] * 30 + [[1, 0]] * 45
        done = [0, 0]
        got = [[], []]
        for step in schedule:
            seqs = [s for s in range(2) if step[s]]
            new = [step[s] for s in seqs]
            ctx = [done[s] + n for s, n in zip(seqs, new)]
            meta = AttentionMetadata.paged(new, ctx, [tables[s] for s in seqs], 16)
            tokens = torch.cat([ids[s][done[s] : c] for s, c in zip(seqs, ctx)])
            positions = torch.cat([torch.arange(done[s], c) for s, c in zip(seqs, ctx)])
            out = model(tokens, positions, meta=meta, kv_cache=cache).split(new)
            for s, o, c in zip(seqs, out, ctx):
                got[s].append(o)
                done[s] = c
    for s in range(2):
        torch.testing.assert_close(torch.cat(got[s]), want[s], rtol=1e-5, atol=1e-5)


def test_training_backward_with_gradient_checkpointing(make_model, random_ids):
    _, model = _pair(make_model)
    model.train()
    ids = random_ids(130)
    meta = AttentionMetadata.packed([90, 40])
    model(ids, meta=meta).logsumexp(-1).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, meta=AttentionMetadata.packed([90, 40])).logsumexp(-1).mean().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert grads["model.layers.0.self_attn.k_proj.weight"].abs().sum() > 0


def test_training_forward_and_backward_under_bf16_autocast(make_model, random_ids):
    """learner.precision bf16-mixed: the CPU reference path runs under autocast (stage-1 scores
    stay float32) and follows the float32 forward."""
    _, model = _pair(make_model)
    ids = random_ids(130)
    want = model(ids, meta=AttentionMetadata.packed([90, 1, 39]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(ids, meta=AttentionMetadata.packed([90, 1, 39]))
    got.float().logsumexp(-1).mean().backward()
    assert (got.float() - want).abs().max() < 0.1 * want.abs().max()
    assert model.model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0


def test_settings_come_from_sparse_config_the_override_or_the_minicpm4_defaults(tmp_path):
    from rlcpm.models.tiny import build_tiny_model_dir

    path = build_tiny_model_dir(tmp_path / "m", "minicpm", sparse_config=SMALL)
    model = load_model(path, attention="sparse")
    assert model.attention_backend.sparse == InfLLMv2Config(**SMALL)
    override = {**SMALL, "topk": 5}
    assert load_model(path, attention="sparse", sparse_config=override).attention_backend.sparse.topk == 5
    llama = build_tiny_model_dir(tmp_path / "l", "llama")
    assert load_model(llama, attention="sparse").attention_backend.sparse == InfLLMv2Config()


def test_an_override_replaces_only_its_own_keys_and_rejects_unknown_ones(tmp_path):
    from rlcpm.errors import UnsupportedModelError
    from rlcpm.models.tiny import build_tiny_model_dir

    path = build_tiny_model_dir(tmp_path / "m", "minicpm", sparse_config=SMALL)
    partial = load_model(path, attention="sparse", sparse_config={"dense_len": 32})
    assert partial.attention_backend.sparse == InfLLMv2Config(**{**SMALL, "dense_len": 32})
    with pytest.raises(UnsupportedModelError, match=r"'top_k' \(did you mean 'topk'\?\)"):
        load_model(path, attention="sparse", sparse_config={"top_k": 4})
    with pytest.raises(UnsupportedModelError, match=r"window_size \(24\) must be a multiple of block_size"):
        load_model(path, attention="sparse", sparse_config={"window_size": 24})


def test_a_llama_checkpoint_keeps_its_sparse_config_through_export(tmp_path):
    from rlcpm.models.checkpoint import read_config, save_model
    from rlcpm.models.tiny import build_tiny_model_dir

    llama = build_tiny_model_dir(tmp_path / "l", "llama")
    model = load_model(llama, attention="sparse", sparse_config=SMALL)
    assert model.config.to_hf()["sparse_config"] == SMALL
    save_model(model, tmp_path / "export")
    assert read_config(tmp_path / "export").sparse_config == SMALL


def test_windows_shorter_than_their_stride_are_refused():
    from rlcpm.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match=r"kernel_size \(2\) must be >= kernel_stride \(4\)"):
        InfLLMv2Config(**{**SMALL, "kernel_size": 2})


def test_a_kv_cache_in_another_dtype_is_refused(make_model, random_ids):
    _, model = _pair(make_model)
    cache = PagedKVCache.for_model(model.config, num_blocks=4, block_size=16, dtype=torch.bfloat16)
    meta = AttentionMetadata.paged([40], [40], [[0, 1, 2]], 16)
    with pytest.raises(EngineError, match="KV cache in the model dtype"):
        model(random_ids(40), torch.arange(40), meta=meta, kv_cache=cache)
