"""Greedy decoding == transformers `generate`, token for token, whatever the batch looks like:
mixed prompt lengths, chunked prefill, few sequences at once, preemption when blocks run out,
the plain paths (no packed linears / no decode mirror), and stopping on EOS."""

from __future__ import annotations

import pytest

from rlcpm.rollout import SamplingParams

GREEDY = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_greedy_matches_transformers_for_mixed_prompt_lengths(model_type, make_engine, hf_greedy, prompts):
    batch = prompts(n=8, seed=1)
    engine = make_engine(model_type, max_num_seqs=8, max_num_batched_tokens=512)
    outs = engine.generate(batch, GREEDY)
    for prompt, out in zip(batch, outs):
        assert out.finish_reason == "length"
        assert out.token_ids == hf_greedy(model_type, prompt, GREEDY.max_new_tokens)


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        dict(max_num_seqs=3, max_num_batched_tokens=16, block_size=4),  # chunked prefill, joins and leaves
        dict(
            max_num_seqs=8, max_num_batched_tokens=64, block_size=4, kv_budget_bytes=24 * 2048
        ),  # preemption
        dict(
            max_num_seqs=5, max_num_batched_tokens=32, pack_linears=False, decode_mirror=False
        ),  # plain paths
    ],
    ids=["chunked-prefill", "preemption", "plain-paths"],
)
def test_batch_composition_does_not_change_greedy_results(engine_kwargs, make_engine, hf_greedy, prompts):
    batch = prompts(n=10, seed=2, max_len=30)
    params = [
        SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in (12, 3, 20, 7) * 2 + (1, 16)
    ]
    engine = make_engine("llama", **engine_kwargs)
    outs = engine.generate(batch, params)
    if "kv_budget_bytes" in engine_kwargs:
        assert engine.engine_stats()["num_preemptions"] > 0, "the KV budget should force preemption"
    for prompt, p, out in zip(batch, params, outs):
        assert out.token_ids == hf_greedy("llama", prompt, p.max_new_tokens)
    # the same requests one at a time give the same tokens
    for prompt, p, out in zip(batch[:3], params[:3], outs[:3]):
        assert engine.generate([prompt], p)[0].token_ids == out.token_ids


def test_eos_stops_a_request_and_is_included(make_engine, hf_greedy, prompts):
    engine = make_engine("llama", max_num_seqs=4)
    batch = prompts(n=4, seed=3)
    free_running = [hf_greedy("llama", p, 10) for p in batch]
    # make the 4th generated token of each prompt its stop token
    outs = engine.generate(
        batch,
        [SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[ids[3]]) for ids in free_running],
    )
    for ids, out in zip(free_running, outs):
        first = ids.index(ids[3])
        assert out.finish_reason == "stop" and out.token_ids == ids[: first + 1]
    # EOS from generation_config.json stops too unless ignore_eos
    eos = sorted(engine.eos_token_ids)[0]
    assert eos in engine.eos_token_ids and len(engine.eos_token_ids) == 2


def test_a_minicpm_directory_loads_and_decodes_like_its_own_forward(tmp_path, prompts):
    """MiniCPM (no transformers class without remote code): Engine.from_pretrained loads the
    directory, tokenizer included, and greedy tokens are the argmax of rlcpm's full forward."""
    import torch

    from rlcpm.models import build_tiny_model_dir, load_model
    from rlcpm.rollout import Engine

    path = build_tiny_model_dir(tmp_path / "minicpm", "minicpm", seed=4, init_std=0.1)
    engine = Engine.from_pretrained(path, dtype="float32")
    model = load_model(path, dtype="float32").eval()
    batch = prompts(n=3, seed=5)
    for prompt, out in zip(batch, engine.generate(batch, GREEDY)):
        ids = torch.tensor([prompt + out.token_ids])
        with torch.no_grad():
            argmax = model(ids).argmax(-1)[0, len(prompt) - 1 : -1]
        assert out.token_ids == argmax.tolist()
