"""Speculative decoding in the engine: greedy output == plain greedy output for any draft subset
and any k (continuous batching, preemption, chunks, stop tokens, weight updates included);
recorded log-probs == the target forward's; draft ids stay in the subset; seeds reproduce."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from rlcpm.models import load_model
from rlcpm.rollout import Engine, Request, SamplingParams, sampling_logprobs
from rlcpm.rollout.draft_head import DraftHead
from rlcpm.rollout.speculative import Drafter

GREEDY = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
SAMPLED = [
    SamplingParams(max_new_tokens=14, temperature=1.0, seed=1, ignore_eos=True),
    SamplingParams(max_new_tokens=14, temperature=0.7, top_k=20, seed=2, ignore_eos=True),
    SamplingParams(max_new_tokens=14, temperature=1.3, top_p=0.8, seed=3, ignore_eos=True),
    SamplingParams(max_new_tokens=14, temperature=0.9, top_k=50, top_p=0.9, seed=4, ignore_eos=True),
    SamplingParams(max_new_tokens=14, temperature=0, ignore_eos=True),
]


@pytest.fixture(scope="module")
def draft_dir(tiny_dirs, tmp_path_factory):
    """The llama target with every weight perturbed by N(0, 0.005^2): a draft that agrees with
    the target's argmax about half of the time (greedy rounds both accept and reject)."""
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("draft") / "llama-draft"
    shutil.copytree(tiny_dirs["llama"], path)
    tensors = load_file(str(path / "model.safetensors"))
    generator = torch.Generator().manual_seed(7)
    for tensor in tensors.values():
        tensor.add_(0.005 * torch.randn(tensor.shape, generator=generator))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture
def spec_engine(tiny_dirs, draft_dir):
    """spec_engine(k, subset=None, **engine_kwargs) -> an Engine over the llama target with the
    perturbed draft; subset: full ids kept by the draft head (None: whole vocabulary)."""

    def make(k: int, subset=None, **kwargs):
        kwargs.setdefault("kv_budget_bytes", 4 * 1024**2)
        target = load_model(str(tiny_dirs["llama"]), dtype="float32")
        draft = load_model(str(draft_dir), dtype="float32")
        drafter = Drafter(draft, DraftHead(draft.lm_head.weight, subset), k)
        return Engine(target, None, eos_token_ids=[], drafter=drafter, **kwargs)

    return make


def _frequent_ids(outputs, eos_id: int, num: int) -> list[int]:
    """A frequency-ranked subset from earlier outputs (+ EOS), as rlcpm freq would build it."""
    ids, counts = np.unique(np.concatenate([o.token_ids for o in outputs]), return_counts=True)
    return sorted(set(ids[np.argsort(-counts, kind="stable")][:num].tolist()) | {eos_id})


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_speculative_equals_plain_greedy_for_any_subset(k, make_engine, spec_engine, prompts):
    batch = prompts(n=7, seed=11)
    plain = make_engine("llama", eos_token_ids=[]).generate(batch, GREEDY)
    subsets = {
        "full": None,
        "frequent": _frequent_ids(plain, eos_id=2, num=24),
        "eos-only": [2],
    }
    for name, subset in subsets.items():
        # 3 sequences at a time: requests join and leave the running batch mid-generation
        engine = spec_engine(k, subset, max_num_seqs=3, max_num_batched_tokens=40)
        outs = engine.generate(batch, GREEDY)
        for p, o in zip(plain, outs):
            assert o.token_ids == p.token_ids, (name, k)
            np.testing.assert_allclose(o.logprobs, p.logprobs, atol=1e-5)
            assert o.finish_reason == "length"
        stats = engine.engine_stats()
        assert stats["spec_draft_tokens"] > 0
        if name == "eos-only":
            assert stats["spec_accepted_tokens"] == 0
        else:
            assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"], name
        assert stats["spec_acceptance_len"] == pytest.approx(
            1 + stats["spec_accepted_tokens"] / stats["spec_num_rounds"]
        )


def test_greedy_equality_survives_preemption_chunks_and_stop_tokens(make_engine, spec_engine, prompts):
    batch = prompts(n=6, seed=12, min_len=20, max_len=40)
    plain = make_engine("llama", eos_token_ids=[]).generate(batch, GREEDY)
    # a stop token that greedy decoding emits mid-way through some outputs
    stop = plain[0].token_ids[5]
    stop_params = SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[stop], ignore_eos=True)
    plain_stop = make_engine("llama", eos_token_ids=[]).generate(batch, stop_params)
    assert plain_stop[0].finish_reason == "stop" and len(plain_stop[0].token_ids) <= 6

    # 24 blocks of 8 slots: too few for 6 sequences of ~60 tokens + lookahead -> preemption
    tight = spec_engine(4, max_num_seqs=6, block_size=8, kv_budget_bytes=_bytes_for_blocks(spec_engine, 24))
    outs = tight.generate(batch, GREEDY)
    assert [o.token_ids for o in outs] == [p.token_ids for p in plain]
    assert tight.engine_stats()["num_preemptions"] > 0

    engine = spec_engine(4, max_num_seqs=6)
    assert [o.token_ids for o in engine.generate(batch, stop_params)] == [p.token_ids for p in plain_stop]

    generated = {i: [] for i in range(len(batch))}
    finished = set()
    while len(finished) < len(batch):
        requests = [Request(i, p, GREEDY, generated[i]) for i, p in enumerate(batch) if i not in finished]
        for out in engine.generate(requests, max_chunk_tokens=7):
            if out.finish_reason == "chunk":
                assert len(out.token_ids) == 7
            generated[out.request_id] += out.token_ids
            if out.finish_reason != "chunk":
                finished.add(out.request_id)
    assert [generated[i] for i in range(len(batch))] == [p.token_ids for p in plain]


def _bytes_for_blocks(spec_engine, num_blocks: int) -> int:
    probe = spec_engine(4, block_size=8)
    per_block = probe.kv_cache.bytes_per_block + probe.speculator.draft_cache.bytes_per_block
    return num_blocks * per_block


def test_recorded_logprobs_are_the_target_forwards(tiny_dirs, spec_engine, prompts):
    batch = prompts(n=len(SAMPLED), seed=13)
    engine = spec_engine(3, max_num_seqs=4, max_num_batched_tokens=48)
    outs = engine.generate(batch, SAMPLED)
    assert engine.engine_stats()["spec_accepted_tokens"] > 0
    target = load_model(str(tiny_dirs["llama"]), dtype="float32")
    for prompt, params, out in zip(batch, SAMPLED, outs):
        assert len(out.token_ids) == params.max_new_tokens
        with torch.no_grad():
            logits = target(torch.tensor([prompt + out.token_ids]))[0, len(prompt) - 1 : -1]
        expected = sampling_logprobs(
            logits, torch.tensor(out.token_ids), params.temperature, params.top_k, params.top_p
        )
        torch.testing.assert_close(torch.tensor(out.logprobs), expected, rtol=0, atol=1e-5)


def test_every_draft_token_lies_in_the_subset(spec_engine, prompts):
    subset = list(range(0, 512, 3)) + [2]
    engine = spec_engine(4, subset, max_num_seqs=4)
    drafted: list[torch.Tensor] = []
    draft = engine.speculator._draft

    def recording_draft(batch, is_sampling, num_drafts):
        ids, rows, probs = draft(batch, is_sampling, num_drafts)
        for row, k in enumerate(num_drafts):
            drafted.append(ids[row, :k].clone())
            assert bool((probs[row, :k].sum(-1) - 1).abs().max() < 1e-4) if k else True
        return ids, rows, probs

    engine.speculator._draft = recording_draft
    engine.generate(prompts(n=6, seed=14), SAMPLED[:3] * 2)
    ids = torch.cat(drafted)
    assert ids.numel() > 30
    assert set(ids.tolist()) <= set(subset)


def test_seeded_speculative_sampling_is_reproducible_and_batch_independent(spec_engine, prompts):
    batch = prompts(n=5, seed=15)
    params = [SamplingParams(max_new_tokens=12, temperature=1.0, seed=s, ignore_eos=True) for s in range(5)]
    engine = spec_engine(3, max_num_seqs=5)
    together = engine.generate(batch, params)
    alone = [spec_engine(3).generate([p], q)[0] for p, q in zip(batch, params)]
    order = [4, 2, 0, 3, 1]
    shuffled = spec_engine(3, max_num_seqs=2).generate([batch[i] for i in order], [params[i] for i in order])
    for i, out in enumerate(together):
        assert alone[i].token_ids == out.token_ids
        assert shuffled[order.index(i)].token_ids == out.token_ids
    assert len({tuple(o.token_ids) for o in together}) == len(batch)


def test_update_weights_changes_the_target_only(tiny_dirs, make_engine, spec_engine, prompts):
    """After an RL weight sync the output follows the new target exactly; the draft keeps its
    weights (acceptance may drop, correctness does not)."""
    batch = prompts(n=4, seed=16)
    engine = spec_engine(3)
    engine.generate(batch, GREEDY)
    draft_before = [p.clone() for p in engine.speculator.drafter.model.parameters()]
    new_weights = {n: p.detach() * 1.05 for n, p in engine.model.named_parameters()}
    engine.update_weights(new_weights.items(), version=1)
    outs = engine.generate(batch, GREEDY)
    plain = make_engine("llama", eos_token_ids=[])
    plain.update_weights(new_weights.items(), version=1)
    assert [o.token_ids for o in outs] == [p.token_ids for p in plain.generate(batch, GREEDY)]
    for before, after in zip(draft_before, engine.speculator.drafter.model.parameters()):
        assert torch.equal(before, after)


def test_from_pretrained_with_a_frequency_file(tiny_dirs, draft_dir, make_engine, prompts, tmp_path):
    """The recipe path: speculative={draft, num_draft_tokens, frspec_vocab} with a real ranking."""
    from transformers import AutoTokenizer

    from rlcpm.rollout.frspec import build_frequency_file

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dirs["llama"]))
    rows = tmp_path / "corpus.jsonl"
    rows.write_text('{"prompt": "What is 12 + 7? The answer is", "response": " 19 apples."}\n' * 3)
    ranking = build_frequency_file(rows, tiny_dirs["llama"], top_k=10, output=tmp_path / "vocab.json")
    engine = Engine.from_pretrained(
        str(tiny_dirs["llama"]),
        dtype="float32",
        kv_budget_bytes=4 * 1024**2,
        speculative={
            "draft": str(draft_dir),
            "num_draft_tokens": 2,
            "frspec_vocab": str(tmp_path / "vocab.json"),
        },
    )
    head = engine.speculator.drafter.head
    expected = set(ranking.token_ids) | set(ranking.always_kept) | set(engine.eos_token_ids)
    assert set(head.subset_ids.tolist()) == expected
    assert tokenizer.eos_token_id in expected
    stop_id = max(set(range(tokenizer.vocab_size)) - expected)  # a rare id, out of the ranking
    with_stop = Engine.from_pretrained(
        str(tiny_dirs["llama"]),
        dtype="float32",
        kv_budget_bytes=4 * 1024**2,
        speculative={"draft": str(draft_dir), "frspec_vocab": str(tmp_path / "vocab.json")},
        draft_keep_token_ids=[stop_id],  # a recipe's rollout.stop_token_ids (SPECS §3.1)
    )
    assert set(with_stop.speculator.drafter.head.subset_ids.tolist()) == expected | {stop_id}
    batch = prompts(n=3, seed=17)
    plain = make_engine("llama").generate(batch, GREEDY)
    assert [o.token_ids for o in engine.generate(batch, GREEDY)] == [p.token_ids for p in plain]


@pytest.mark.parametrize("k", [2, 5])
def test_a_draft_equal_to_the_target_is_always_accepted(k, tiny_dirs, prompts):
    """Draft == target: every draft token must be accepted (greedy and sampled, p == q), which
    holds only if the draft's KV is exactly in step with the tokens after every rollback,
    lagging round, chunk pause and preemption."""
    target = load_model(str(tiny_dirs["llama"]), dtype="float32")
    draft = load_model(str(tiny_dirs["llama"]), dtype="float32")
    engine = Engine(
        target,
        None,
        eos_token_ids=[],
        drafter=Drafter(draft, DraftHead(draft.lm_head.weight), k),
        max_num_seqs=4,
        block_size=8,
        kv_budget_bytes=_bytes_for_blocks_of(target, draft, 8, 18),
    )
    batch = prompts(n=6, seed=18, min_len=10, max_len=40)
    params = [
        SamplingParams(max_new_tokens=23, temperature=0 if i % 2 else 1.0, seed=i, ignore_eos=True)
        for i in range(len(batch))
    ]
    generated = {i: [] for i in range(len(batch))}
    finished = set()
    while len(finished) < len(batch):
        requests = [Request(i, p, params[i], generated[i]) for i, p in enumerate(batch) if i not in finished]
        for out in engine.generate(requests, max_chunk_tokens=9):
            generated[out.request_id] += out.token_ids
            if out.finish_reason != "chunk":
                finished.add(out.request_id)
    stats = engine.engine_stats()
    assert stats["num_preemptions"] > 0
    assert stats["spec_draft_tokens"] > 60
    assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"]


def _bytes_for_blocks_of(target, draft, block_size: int, num_blocks: int) -> int:
    from rlcpm.models.kv_cache import PagedKVCache

    return num_blocks * sum(
        PagedKVCache.block_bytes(
            m.config.num_hidden_layers, block_size, m.config.num_key_value_heads, m.config.head_dim, m.dtype
        )
        for m in (target, draft)
    )


def test_speculative_settings_are_checked_like_a_recipe(tiny_dirs, draft_dir):
    """A typo used to turn FR-Spec off silently ({"frspec": ...} ran a full draft head)."""
    from rlcpm.errors import EngineError

    target = str(tiny_dirs["llama"])
    for bad, message in [
        ({"draft": str(draft_dir), "frspec": "vocab.json"}, "frspec\n  Extra inputs are not permitted"),
        ({"draft": str(draft_dir), "num_draft_tokens": 2.5}, "num_draft_tokens\n  Input should be a valid integer"),
        ({"num_draft_tokens": 2}, "draft\n  Field required"),
    ]:
        with pytest.raises(EngineError, match=message):
            Engine.from_pretrained(target, dtype="float32", speculative=bad)


def test_speculative_paths_may_be_path_objects(tiny_dirs, draft_dir, make_engine, prompts, tmp_path):
    """Engine.from_pretrained takes a pathlib.Path; so do the speculative settings' paths (a Path
    draft or frspec_vocab was refused with "Input should be a valid string")."""
    from rlcpm.rollout.frspec import build_frequency_file

    rows = tmp_path / "corpus.jsonl"
    rows.write_text('{"prompt": "What is 12 + 7?", "response": " 19"}\n')
    build_frequency_file(rows, tiny_dirs["llama"], top_k=10, output=tmp_path / "vocab.json")
    engine = Engine.from_pretrained(
        tiny_dirs["llama"],
        dtype="float32",
        kv_budget_bytes=4 * 1024**2,
        speculative={"draft": draft_dir, "num_draft_tokens": 2, "frspec_vocab": tmp_path / "vocab.json"},
    )
    assert not engine.speculator.drafter.head.is_full_vocabulary
    batch = prompts(n=2, seed=19)
    plain = make_engine("llama").generate(batch, GREEDY)
    assert [o.token_ids for o in engine.generate(batch, GREEDY)] == [p.token_ids for p in plain]


def test_a_draft_with_another_tokenizer_is_refused(tiny_dirs, draft_dir, tmp_path):
    from rlcpm.errors import EngineError
    from rlcpm.models.tiny import save_tokenizer
    from rlcpm.models.tiny_tokenizer import build_tokenizer

    other = tmp_path / "draft-other-tokenizer"
    shutil.copytree(draft_dir, other)
    save_tokenizer(build_tokenizer(vocab_size=512, seed=1), other)  # same size, other ids
    with pytest.raises(EngineError, match="has another tokenizer than the target"):
        Engine.from_pretrained(str(tiny_dirs["llama"]), dtype="float32", speculative={"draft": str(other)})


def test_a_draft_path_may_start_with_a_tilde(tiny_dirs, draft_dir, tmp_path, monkeypatch):
    """`~` in rollout.speculative.draft, as in model.path: the preflight accepted "~/draft", then
    every rollout worker failed with "model directory not found: ~/draft" (and a draft with
    another tokenizer given so was not checked)."""
    from rlcpm.errors import EngineError
    from rlcpm.models.tiny import save_tokenizer
    from rlcpm.models.tiny_tokenizer import build_tokenizer

    monkeypatch.setenv("HOME", str(draft_dir.parent))
    engine = Engine.from_pretrained(
        str(tiny_dirs["llama"]),
        dtype="float32",
        kv_budget_bytes=4 * 1024**2,
        speculative={"draft": f"~/{draft_dir.name}"},
    )
    assert engine.speculator is not None
    other = draft_dir.parent / "draft-other-tokenizer-home"
    shutil.copytree(draft_dir, other)
    save_tokenizer(build_tokenizer(vocab_size=512, seed=1), other)
    with pytest.raises(EngineError, match="has another tokenizer than the target"):
        Engine.from_pretrained(
            str(tiny_dirs["llama"]), dtype="float32", speculative={"draft": f"~/{other.name}"}
        )


@pytest.mark.parametrize("num", [1, 2, 3, 16])
def test_the_benchmark_takes_any_number_of_prompts(num):
    """`python -m benchmarks.speculative --prompts 2` (a quick run) failed after training with
    "synthetic option 'num_samples' must be an integer >= 1, got 0": the mixture asked every
    task for its share, even an empty one."""
    from benchmarks.speculative import task_rows

    assert len(task_rows(num, seed=7)) == num
