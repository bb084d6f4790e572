"""update_weights: streamed in place, versioned, timed and verified; a failed stream leaves the
engine refusing to generate instead of claiming the new version."""

from __future__ import annotations

import pytest
import torch

from rlcpm.errors import EngineError, WeightSyncError
from rlcpm.models import load_model
from rlcpm.rollout import SamplingParams

GREEDY = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)


def _other_weights(tiny_dirs, seed: int = 0):
    """(model, named tensors) of the tiny llama with perturbed weights (same names and shapes)."""
    model = load_model(str(tiny_dirs["llama"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model, [(name, param.detach().clone()) for name, param in model.named_parameters()]


def _greedy_reference(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_update_weights_streams_in_place_and_generation_follows(make_engine, tiny_dirs, prompts):
    engine = make_engine("llama", max_num_seqs=4)
    batch = prompts(n=3, seed=11)
    before = engine.generate(batch, GREEDY)
    pointers = {n: p.data_ptr() for n, p in engine.model.named_parameters()}
    new_model, tensors = _other_weights(tiny_dirs)
    stats = engine.update_weights(iter(tensors), version=7)  # a generator: one tensor at a time
    assert engine.weight_version == 7 and stats["version"] == 7
    assert stats["num_tensors"] == len(tensors) and stats["seconds"] >= 0
    assert stats["num_bytes"] == sum(t.numel() * t.element_size() for _, t in tensors)
    assert {n: p.data_ptr() for n, p in engine.model.named_parameters()} == pointers  # no new storage
    after = engine.generate(batch, GREEDY)
    assert all(o.weight_version == 7 for o in after)
    assert [o.token_ids for o in after] != [o.token_ids for o in before]
    for prompt, out in zip(batch, after):
        assert out.token_ids == _greedy_reference(new_model, prompt, GREEDY.max_new_tokens)
    engine.update_weights(tensors)  # no version: old + 1
    assert engine.weight_version == 8


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (
            lambda n, t: ("model.layers.0.self_attn.q_projj.weight", t),
            "unknown tensor 'model.layers.0.self_attn.q_projj.weight'.*did you mean",
        ),
        (lambda n, t: (n, t[:-1]), "has shape"),
        (lambda n, t: (n, t.to(torch.float64)), "has dtype torch.float64"),
    ],
    ids=["unknown-name", "shape", "dtype"],
)
def test_a_bad_tensor_mid_stream_is_named_and_the_engine_refuses_to_generate(
    corrupt, match, make_engine, tiny_dirs
):
    engine = make_engine("llama")
    _, tensors = _other_weights(tiny_dirs)
    bad_index = 5
    stream = [corrupt(*tensors[i]) if i == bad_index else tensors[i] for i in range(len(tensors))]
    with pytest.raises(WeightSyncError, match=match):
        engine.update_weights(stream, version=1)
    assert engine.weight_version == 0
    with pytest.raises(EngineError, match="partial update"):
        engine.generate([[1, 2, 3]], GREEDY)
    engine.update_weights(tensors, version=2)  # a complete update repairs it
    assert engine.generate([[1, 2, 3]], GREEDY)[0].weight_version == 2


def test_a_bad_first_tensor_changes_nothing_and_strict_updates_need_every_parameter(make_engine, tiny_dirs):
    engine = make_engine("llama")
    _, tensors = _other_weights(tiny_dirs)
    name, tensor = tensors[0]
    with pytest.raises(WeightSyncError, match="has shape"):
        engine.update_weights([(name, tensor.t())], version=1)
    assert engine.generate([[1, 2]], GREEDY)[0].weight_version == 0  # still consistent: nothing copied
    with pytest.raises(WeightSyncError, match="missed 1 parameter"):
        engine.update_weights(tensors[:-1], version=1)
    engine.update_weights(tensors[:-1], version=1, strict=False)
    assert engine.weight_version == 1
    with pytest.raises(WeightSyncError, match="version must be an int"):
        engine.update_weights(tensors, version="2")


def test_update_weights_drops_paused_kv_so_continuations_are_reprefilled(make_engine, tiny_dirs):
    engine = make_engine("llama")
    out = engine.generate(
        [[4, 5, 6, 7]], SamplingParams(max_new_tokens=10, seed=1, ignore_eos=True), max_chunk_tokens=3
    )[0]
    assert out.finish_reason == "chunk" and engine.engine_stats()["num_paused"] == 1
    _, tensors = _other_weights(tiny_dirs)
    engine.update_weights(tensors, version=1)
    assert engine.engine_stats()["num_paused"] == 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_stream_that_breaks_off_leaves_the_engine_refusing_until_it_is_repaired(make_engine, tiny_dirs):
    engine = make_engine("llama")
    _, tensors = _other_weights(tiny_dirs)

    def lost_connection():
        yield from tensors[:3]
        raise ConnectionError("learner went away")

    with pytest.raises(ConnectionError):
        engine.update_weights(lost_connection(), version=1)
    with pytest.raises(EngineError, match="partial update .*ConnectionError: learner went away"):
        engine.generate([[1, 2, 3]], GREEDY)
    with pytest.raises(WeightSyncError, match="re-send every tensor of the failed update"):
        engine.update_weights([], strict=False)  # an empty update repairs nothing
    with pytest.raises(EngineError, match="partial update"):
        engine.generate([[1, 2, 3]], GREEDY)
    engine.update_weights(tensors[:3], version=2, strict=False)  # the touched tensors, consistently
    assert engine.generate([[1, 2, 3]], GREEDY)[0].weight_version == 2


def test_good_weights_after_nan_weights_generate_as_before(make_engine, tiny_dirs):
    # A diverged step, then a rollback: no NaN key or value may survive in any cache (a masked
    # key's probability 0 times a stale NaN is NaN).
    engine = make_engine("llama")
    good = [(n, p.detach().clone()) for n, p in engine.model.named_parameters()]
    batch = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    before = engine.generate(batch, GREEDY)
    engine.update_weights([(n, torch.full_like(t, float("nan"))) for n, t in good])
    engine.generate(batch, GREEDY)
    engine.update_weights(good)
    after = engine.generate(batch, GREEDY)
    assert [o.token_ids for o in after] == [o.token_ids for o in before]
    assert all(torch.isfinite(torch.tensor(o.logprobs)).all() for o in after)


def test_an_update_in_parts_is_refused_until_finished_complete(make_engine, tiny_dirs):
    """A learner streaming bucket by bucket to several engines: begin, load per bucket, finish.
    The engine never samples with a half-updated model and takes the version only at finish."""
    engine = make_engine("llama")
    new_model, tensors = _other_weights(tiny_dirs)
    engine.begin_weight_update(3)
    engine.load_weights(tensors[:4])
    with pytest.raises(EngineError, match="partial update .*version 3 is still arriving"):
        engine.generate([[1, 2, 3]], GREEDY)
    with pytest.raises(WeightSyncError, match="missed"):
        engine.finish_weight_update()  # a bucket is missing: still refusing, still version 0
    assert engine.weight_version == 0
    with pytest.raises(EngineError, match="partial update"):
        engine.generate([[1, 2, 3]], GREEDY)
    engine.begin_weight_update(4)
    engine.load_weights(tensors[:4])
    engine.load_weights(tensors[4:])
    stats = engine.finish_weight_update()
    assert engine.weight_version == 4 and stats["num_tensors"] == len(tensors)
    out = engine.generate([[1, 2, 3]], GREEDY)[0]
    assert out.weight_version == 4 and out.token_ids == _greedy_reference(new_model, [1, 2, 3], 8)
    with pytest.raises(WeightSyncError, match="without begin"):
        engine.load_weights(tensors[:1])
