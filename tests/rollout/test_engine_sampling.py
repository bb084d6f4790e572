"""Behaviour log-probs == the learner's recomputation; seeded sampling is reproducible and
independent of batch composition; chunked == unchunked (KV kept and KV dropped); the engine's
samples follow the intended distribution (chi-square); the G samples of a prompt share its KV."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from rlcpm.models import load_model
from rlcpm.rollout import Request, SamplingParams, sampling_logprobs

SAMPLED = [
    SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True),
    SamplingParams(max_new_tokens=16, temperature=1.0, seed=1, ignore_eos=True),
    SamplingParams(max_new_tokens=16, temperature=0.7, top_k=20, seed=2, ignore_eos=True),
    SamplingParams(max_new_tokens=16, temperature=1.3, top_p=0.8, seed=3, ignore_eos=True),
    SamplingParams(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.9, seed=4, ignore_eos=True),
]


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_engine_logprobs_equal_the_learner_forward(model_type, tiny_dirs, make_engine, prompts):
    batch = prompts(n=len(SAMPLED), seed=4)
    engine = make_engine(model_type, max_num_seqs=4, max_num_batched_tokens=32)
    outs = engine.generate(batch, SAMPLED)
    learner_model = load_model(str(tiny_dirs[model_type]), dtype="float32")
    for prompt, params, out in zip(batch, SAMPLED, outs):
        assert len(out.token_ids) == params.max_new_tokens
        ids = torch.tensor([prompt + out.token_ids])
        with torch.no_grad():
            logits = learner_model(ids)[0, len(prompt) - 1 : -1]  # [N, V] predicting each new token
        expected = sampling_logprobs(
            logits, torch.tensor(out.token_ids), params.temperature, params.top_k, params.top_p
        )
        torch.testing.assert_close(torch.tensor(out.logprobs), expected, rtol=0, atol=1e-5)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(make_engine, prompts):
    batch = prompts(n=6, seed=5)
    params = [
        SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=s, ignore_eos=True)
        for s in range(6)
    ]
    engine = make_engine("llama", max_num_seqs=6)
    together = engine.generate(batch, params)
    again = engine.generate(batch, params)
    alone = [engine.generate([p], q)[0] for p, q in zip(batch, params)]
    other = make_engine("llama", max_num_seqs=2, max_num_batched_tokens=16)
    shuffled_order = [3, 0, 5, 1, 4, 2]
    shuffled = other.generate([batch[i] for i in shuffled_order], [params[i] for i in shuffled_order])
    for i, out in enumerate(together):
        assert again[i].token_ids == out.token_ids
        assert alone[i].token_ids == out.token_ids
        assert shuffled[shuffled_order.index(i)].token_ids == out.token_ids
        np.testing.assert_allclose(alone[i].logprobs, out.logprobs, atol=1e-5)
    assert len({tuple(o.token_ids) for o in together}) > 1
    # a different seed gives a different sample
    reseeded = engine.generate(
        batch[:1], SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=99, ignore_eos=True)
    )
    assert reseeded[0].token_ids != together[0].token_ids


@pytest.mark.parametrize("between_chunks", ["kv-kept", "kv-dropped", "weights-reloaded"])
def test_chunked_generation_equals_unchunked(between_chunks, make_engine, prompts):
    """kv-kept: paused KV resumed; kv-dropped: paused KV freed (re-prefill, prefix cache still
    warm); weights-reloaded: update_weights with the same tensors (everything re-prefilled)."""
    batch = prompts(n=5, seed=6)
    params = SamplingParams(max_new_tokens=17, temperature=1.0, seed=7, ignore_eos=True)
    engine = make_engine("llama", max_num_seqs=5)
    full = engine.generate([Request(f"full-{i}", p, params) for i, p in enumerate(batch)])
    same_weights = [(n, p.detach().clone()) for n, p in engine.model.named_parameters()]
    generated: dict[int, list[int]] = {i: [] for i in range(len(batch))}
    logprobs: dict[int, list[float]] = {i: [] for i in range(len(batch))}
    finished: dict[int, str] = {}
    prefilled = []
    while len(finished) < len(batch):
        requests = [Request(i, p, params, generated[i]) for i, p in enumerate(batch) if i not in finished]
        before = engine.engine_stats()["num_prefill_tokens"]
        outs = engine.generate(requests, max_chunk_tokens=5)
        prefilled.append(engine.engine_stats()["num_prefill_tokens"] - before)
        for out in outs:
            assert out.num_previous_tokens == len(generated[out.request_id])
            generated[out.request_id] += out.token_ids
            logprobs[out.request_id] += out.logprobs
            if out.finish_reason == "chunk":
                assert len(out.token_ids) == 5
            else:
                finished[out.request_id] = out.finish_reason
        if between_chunks == "kv-dropped":
            assert engine.drop_paused() == sum(o.finish_reason == "chunk" for o in outs)
        elif between_chunks == "weights-reloaded":
            engine.update_weights(same_weights)
    assert len(prefilled) == 4  # 17 tokens in chunks of 5
    for i, out in enumerate(full):
        assert generated[i] == out.token_ids and finished[i] == "length"
        np.testing.assert_allclose(logprobs[i], out.logprobs, atol=1e-5)
    full_reprefill = sum(len(p) for p in batch) + 5 * len(batch)  # prompt + 5 tokens, before call 2
    if between_chunks == "kv-kept":
        assert prefilled[1:] == [0, 0, 0]
    elif between_chunks == "kv-dropped":
        assert 0 < prefilled[1] < full_reprefill
    else:
        assert prefilled[1] == full_reprefill


def test_engine_samples_follow_the_softmax_of_the_model(make_engine, tiny_dirs):
    """2000 one-token samples of one prompt (seeds 0..1999) against softmax(logits / T) with top-k."""
    prompt = [5, 17, 301, 42] * 10
    temperature, top_k, num_samples = 1.5, 8, 2000
    engine = make_engine("llama", max_num_seqs=256, max_num_batched_tokens=1024)
    params = [
        SamplingParams(max_new_tokens=1, temperature=temperature, top_k=top_k, seed=s)
        for s in range(num_samples)
    ]
    outs = engine.generate([prompt] * num_samples, params)
    with torch.no_grad():
        logits = load_model(str(tiny_dirs["llama"]), dtype="float32")(torch.tensor([prompt]))[0, -1]
    probs = torch.softmax(logits / temperature, -1)
    top = probs.topk(top_k)
    expected = (top.values.double() / top.values.double().sum()).numpy() * num_samples
    sampled = np.array([o.token_ids[0] for o in outs])
    assert set(sampled.tolist()) <= set(top.indices.tolist())
    counts = np.array([(sampled == t).sum() for t in top.indices.tolist()])
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    # the 2 full blocks of the prompt are computed once, only the 8-token tail per sample
    assert engine.engine_stats()["num_prefill_tokens"] == 32 + num_samples * 8


def test_samples_of_one_prompt_prefill_it_once(make_engine, prompts):
    prompt = prompts(n=1, seed=8, min_len=37, max_len=37)[0]
    engine = make_engine("llama", max_num_seqs=8, block_size=8)
    params = [SamplingParams(max_new_tokens=4, temperature=1.0, seed=s, ignore_eos=True) for s in range(8)]
    outs = engine.generate([prompt] * 8, params)
    # 37 tokens = 4 full blocks of 8 (computed once) + a 5-token tail computed by each sample
    assert engine.engine_stats()["num_prefill_tokens"] == 32 + 8 * 5
    assert all(o.num_cached_prompt_tokens == 32 for o in outs[1:])
    solo = make_engine("llama", max_num_seqs=1).generate([prompt], params[3])[0]
    assert solo.token_ids == outs[3].token_ids


@pytest.mark.parametrize("prompt_len", [33, 40])
def test_siblings_sharing_blocks_written_in_the_same_step_get_exact_logprobs(
    prompt_len, tiny_dirs, make_engine, prompts
):
    """Samples admitted with the prompt that computes their shared blocks may have a single token
    left; they must read those blocks after this forward writes them (not a stale decode mirror)."""
    prompt = prompts(n=1, seed=9, min_len=prompt_len, max_len=prompt_len)[0]
    engine = make_engine("llama", max_num_seqs=8, block_size=8)
    params = [SamplingParams(max_new_tokens=6, temperature=1.0, seed=s, ignore_eos=True) for s in range(4)]
    outs = engine.generate([prompt] * 4, params)
    assert all(o.num_cached_prompt_tokens == (prompt_len - 1) // 8 * 8 for o in outs[1:])
    learner_model = load_model(str(tiny_dirs["llama"]), dtype="float32")
    for out in outs:
        ids = torch.tensor([prompt + out.token_ids])
        with torch.no_grad():
            logits = learner_model(ids)[0, len(prompt) - 1 : -1]
        expected = sampling_logprobs(logits, torch.tensor(out.token_ids), 1.0)
        torch.testing.assert_close(torch.tensor(out.logprobs), expected, rtol=0, atol=1e-5)
