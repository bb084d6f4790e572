"""The rollout engine with InfLLM v2 sparse attention on a tiny MiniCPM: its greedy tokens are the
argmax of the learner's sparse forward at every step and its behaviour log-probs match the
learner's within 1e-5 (same selection code), through chunked prefill mixed with decodes, prefix
sharing, and the dense_len switch inside a prompt."""

from __future__ import annotations

import pytest
import torch

from rlcpm.errors import EngineError
from rlcpm.models import load_model
from rlcpm.rollout import Engine, SamplingParams, sampling_logprobs

# k_eff = topk 4 + 2 local = 6 blocks of 16 tokens (3 forced: init, 2 local, own; 3 chosen by
# score): contexts of ~250 tokens really are sparse.
SPARSE = dict(
    kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32, topk=4, dense_len=64
)


@pytest.fixture(autouse=True)
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def minicpm_dir(tmp_path_factory):
    from rlcpm.models.tiny import build_tiny_model_dir

    return build_tiny_model_dir(
        tmp_path_factory.mktemp("sparse"),
        "minicpm",
        seed=3,
        init_std=0.1,
        max_position_embeddings=512,
        sparse_config=SPARSE,
    )


def _prompts():
    gen = torch.Generator().manual_seed(0)
    lengths = [30, 90, 150]  # below dense_len, straddling it, past it
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in lengths]
    return prompts + [prompts[0]]  # a repeated prompt shares its KV prefix


def _engine(path, **kwargs) -> Engine:
    # (Engine.from_pretrained needs a transformers-known model_type for AutoTokenizer; minicpm is not.)
    model = load_model(str(path), dtype="float32", attention="sparse")
    return Engine(model, kv_budget_bytes=8 * 1024**2, **kwargs)


def test_engine_greedy_equals_the_learner_sparse_forward(minicpm_dir):
    engine = _engine(minicpm_dir, max_num_seqs=4, max_num_batched_tokens=48, block_size=16)
    params = [
        SamplingParams(max_new_tokens=100, temperature=0, ignore_eos=True),
        SamplingParams(max_new_tokens=100, temperature=0, ignore_eos=True),
        SamplingParams(max_new_tokens=100, temperature=0, ignore_eos=True),
        SamplingParams(max_new_tokens=100, temperature=1.0, seed=7, ignore_eos=True),
    ]
    outs = engine.generate(_prompts(), params)
    learner = load_model(str(minicpm_dir), dtype="float32", attention="sparse")
    dense = load_model(str(minicpm_dir), dtype="float32")
    differs_from_dense = 0.0
    for prompt, param, out in zip(_prompts(), params, outs):
        tokens = torch.tensor(out.token_ids)
        assert tokens.numel() == 100
        ids = torch.tensor([prompt + out.token_ids])
        with torch.no_grad():
            logits = learner(ids)[0, len(prompt) - 1 : -1]  # [100, V]: the prediction of each new token
            dense_logits = dense(ids)[0, len(prompt) - 1 : -1]
        if param.temperature == 0:
            assert torch.equal(logits.argmax(-1), tokens), "greedy token != learner argmax"
        expected = sampling_logprobs(logits, tokens, param.temperature, param.top_k, param.top_p)
        torch.testing.assert_close(torch.tensor(out.logprobs), expected, rtol=0, atol=1e-5)
        differs_from_dense = max(differs_from_dense, float((logits - dense_logits).abs().max()))
    assert differs_from_dense > 1e-2  # blocks really were dropped
    assert engine.block_manager.num_prefix_hits > 0
    # Alone in its batches, a short prompt decodes densely until dense_len, then sparsely: the
    # compressed keys of its dense steps must have been kept.
    prompt = _prompts()[0][:20]
    alone = engine.generate([prompt], SamplingParams(max_new_tokens=120, temperature=0, ignore_eos=True))[0]
    with torch.no_grad():
        logits = learner(torch.tensor([prompt + alone.token_ids]))[0, len(prompt) - 1 : -1]
    assert torch.equal(logits.argmax(-1), torch.tensor(alone.token_ids))
    expected = sampling_logprobs(logits, torch.tensor(alone.token_ids), 0.0, -1, 1.0)
    torch.testing.assert_close(torch.tensor(alone.logprobs), expected, rtol=0, atol=1e-5)


def test_a_kv_block_size_incompatible_with_the_compression_stride_is_refused(minicpm_dir):
    with pytest.raises(EngineError, match="block_size \\(12\\) must be a multiple or a divisor"):
        _engine(minicpm_dir, block_size=12)  # at construction, not at the first forward
