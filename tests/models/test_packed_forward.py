"""Packed variable-length training forward: equal to per-sequence forwards, values and gradients."""

from __future__ import annotations

import pytest
import torch

from rlcpm.models import AttentionMetadata

LENGTHS = [7, 1, 19, 4, 12]  # ragged: the dense backend runs one attention call per sequence
SIMILAR = [9, 11, 10, 11]  # similar: the dense backend runs one padded call for all
BUCKETED = [30, 3, 4, 28, 3, 29]  # dense: calls for {30, 29, 28} (padded), {4}, {3, 3}, out of order


def _packed_and_single(model, seqs):
    meta = AttentionMetadata.packed([len(s) for s in seqs])
    positions = torch.cat([torch.arange(len(s)) for s in seqs])
    packed = model(torch.cat(seqs), positions, meta=meta)
    single = torch.cat([model(s[None])[0] for s in seqs])
    return packed, single


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "minicpm"])
@pytest.mark.parametrize("backend", ["dense", "reference"])
@pytest.mark.parametrize("lengths", [LENGTHS, SIMILAR, BUCKETED], ids=["ragged", "similar", "bucketed"])
def test_packed_equals_per_sequence(model_type, backend, lengths, make_model, random_ids):
    model = make_model(model_type, num_key_value_heads=2)
    model.set_attention_backend(backend)
    seqs = [random_ids(n, seed=i) for i, n in enumerate(lengths)]
    with torch.no_grad():
        packed, single = _packed_and_single(model, seqs)
    assert packed.shape == (sum(lengths), 96)
    assert (packed - single).abs().max().item() <= 1e-5


def test_dense_backend_equals_reference_backend(make_model, random_ids):
    model = make_model("qwen3", num_key_value_heads=1)
    seqs = [random_ids(n, seed=i) for i, n in enumerate(LENGTHS)]
    meta = AttentionMetadata.packed(LENGTHS)
    ids = torch.cat(seqs)
    with torch.no_grad():
        dense = model(ids, meta=meta)
        model.set_attention_backend("reference")
        reference = model(ids, meta=AttentionMetadata.packed(LENGTHS))
    assert (dense - reference).abs().max().item() <= 1e-5


def test_default_positions_restart_per_sequence(make_model, random_ids):
    model = make_model("llama")
    seqs = [random_ids(n, seed=i) for i, n in enumerate(LENGTHS)]
    meta = AttentionMetadata.packed(LENGTHS)
    with torch.no_grad():
        implicit = model(torch.cat(seqs), meta=meta)
        explicit, _ = _packed_and_single(model, seqs)
    assert torch.equal(implicit, explicit)


@pytest.mark.parametrize("lengths", [LENGTHS, SIMILAR, BUCKETED], ids=["ragged", "similar", "bucketed"])
def test_packed_gradients_equal_per_sequence_gradients(lengths, make_model, random_ids):
    model = make_model("qwen2").train()
    seqs = [random_ids(n, seed=i) for i, n in enumerate(lengths)]
    weights = torch.randn(sum(lengths), 96, generator=torch.Generator().manual_seed(3))

    def grads(packed: bool):
        model.zero_grad()
        if packed:
            out = model(torch.cat(seqs), meta=AttentionMetadata.packed(lengths))
        else:
            out = torch.cat([model(s[None])[0] for s in seqs])
        (out * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    packed, single = grads(True), grads(False)
    for name in single:
        # float32 sums in a different order: agree to ~1e-6 of the gradient's scale.
        scale = single[name].abs().max().item()
        assert (packed[name] - single[name]).abs().max().item() <= 2e-6 * scale, name


def test_gradient_checkpointing_gives_same_loss_and_grads(make_model, random_ids):
    model = make_model("llama").train()
    ids = random_ids(2, 16)

    def run():
        model.zero_grad()
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_plain, grads_plain = run()
    model.gradient_checkpointing_enable()
    loss_ckpt, grads_ckpt = run()
    assert torch.equal(loss_plain, loss_ckpt)
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("model_type,tied", [("llama", False), ("qwen3", True), ("minicpm", False)])
def test_return_hidden_then_compute_logits_equals_logits(model_type, tied, make_model, random_ids):
    model = make_model(model_type, tie_word_embeddings=tied)
    ids = random_ids(3, 9)
    with torch.no_grad():
        hidden = model(ids, return_hidden=True)
        logits = model(ids)
    assert hidden.shape == (3, 9, 64)
    assert torch.equal(model.compute_logits(hidden), logits)
    # The head is one matrix the learner / FR-Spec can slice: logits = hidden @ W^T.
    torch.testing.assert_close(hidden @ model.lm_head.weight.T, logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------- shared prefixes

# (prompt length, continuation lengths); the dense backend attends each prompt's continuations
# in length buckets (length_buckets): one padded call for similar ones, alone when ragged
SHARED = {"similar": [(6, [5, 4, 5]), (3, [2, 3])], "ragged": [(5, [1, 17, 2]), (4, [9])],
          "bucketed": [(4, [20, 3, 19, 2, 18]), (2, [6])]}  # dense: {20, 19, 18} padded, {3}, {2}


def _shared_and_unshared(model, groups, random_ids):
    """The same prompts + continuations packed twice: with each prompt once (prefix_seq), and
    as ordinary sequences (prompt + continuation each). Returns both streams' pieces."""
    shared_ids, shared_pos, seg_lens, prefix = [], [], [], []
    plain_ids, plain_lens, pick_shared, pick_plain = [], [], [], []
    offset_shared = offset_plain = 0
    for g, (num_prompt, lens) in enumerate(groups):
        prompt = random_ids(num_prompt, seed=100 + g)
        prompt_segment = len(seg_lens)
        shared_ids.append(prompt), shared_pos.append(torch.arange(num_prompt))
        seg_lens.append(num_prompt), prefix.append(-1)
        pick_shared += range(offset_shared, offset_shared + num_prompt)
        offset_shared += num_prompt
        for c, n in enumerate(lens):
            own = random_ids(n, seed=10 * g + c)
            shared_ids.append(own), shared_pos.append(torch.arange(num_prompt, num_prompt + n))
            seg_lens.append(n), prefix.append(prompt_segment)
            pick_shared += range(offset_shared, offset_shared + n)
            offset_shared += n
            plain_ids += [prompt, own]
            plain_lens.append(num_prompt + n)
            if c == 0:  # the prompt's rows, once
                pick_plain += range(offset_plain, offset_plain + num_prompt)
            pick_plain += range(offset_plain + num_prompt, offset_plain + num_prompt + n)
            offset_plain += num_prompt + n
    shared = (
        torch.cat(shared_ids),
        torch.cat(shared_pos),
        AttentionMetadata.packed(seg_lens, prefix_seq=prefix),
    )
    plain = (torch.cat(plain_ids), None, AttentionMetadata.packed(plain_lens))
    return shared, plain, torch.tensor(pick_shared), torch.tensor(pick_plain)


@pytest.mark.parametrize("backend", ["dense", "reference"])
@pytest.mark.parametrize("case", list(SHARED))
def test_shared_prefix_packing_equals_repeating_the_prompt(backend, case, make_model, random_ids):
    """A prompt stored once for several continuations gives the same outputs (on every row that
    exists in both layouts) and the same parameter gradients as repeating it per continuation."""
    model = make_model("qwen3", num_key_value_heads=2).train()
    model.set_attention_backend(backend)
    shared, plain, pick_shared, pick_plain = _shared_and_unshared(model, SHARED[case], random_ids)
    weights = torch.randn(pick_shared.numel(), 96, generator=torch.Generator().manual_seed(3))

    def run(ids, positions, meta, pick):
        model.zero_grad()
        out = model(ids, positions, meta=meta)[pick]
        (out * weights).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    # a prompt row repeated in the plain layout gets its gradient weight once: pick it once
    out_shared, grads_shared = run(*shared, pick_shared)
    out_plain, grads_plain = run(*plain, pick_plain)
    assert (out_shared - out_plain).abs().max().item() <= 1e-5
    for name in grads_plain:
        scale = grads_plain[name].abs().max().item()
        assert (grads_shared[name] - grads_plain[name]).abs().max().item() <= 2e-6 * max(scale, 1e-6), name


def test_default_positions_continue_after_a_shared_prefix(make_model, random_ids):
    """Without explicit positions a continuation's tokens are numbered after its prefix (they were
    restarted at 0, which rotated them as if the prompt were not there)."""
    model = make_model("qwen3", num_key_value_heads=2)
    (ids, positions, meta), *_ = _shared_and_unshared(model, SHARED["similar"], random_ids)
    with torch.no_grad():
        implicit = model(ids, meta=meta)
        explicit = model(ids, positions, meta=meta)
    assert torch.equal(implicit, explicit)


def test_invalid_shared_prefixes_are_refused():
    from rlcpm.errors import EngineError

    with pytest.raises(EngineError, match="earlier sequence without a prefix"):
        AttentionMetadata.packed([3, 2, 2], prefix_seq=[-1, 0, 1])  # a prefix of a continuation
    with pytest.raises(EngineError, match="earlier sequence"):
        AttentionMetadata.packed([3, 2], prefix_seq=[1, -1])  # a later prefix
    assert AttentionMetadata.packed([3, 2], prefix_seq=[-1, -1]).prefix_seq is None


def test_a_backend_without_shared_prefix_support_refuses_them(make_model, random_ids):
    from rlcpm.errors import UnsupportedModelError

    model = make_model("llama")
    model.set_attention_backend("sparse")
    meta = AttentionMetadata.packed([4, 3], prefix_seq=[-1, 0])
    with pytest.raises(UnsupportedModelError, match="shared prefixes"):
        model(random_ids(7), torch.tensor([0, 1, 2, 3, 4, 5, 6]), meta=meta)
