"""The engine's FusedDecoder (CPU float32 fast path) computes the model's forward: same logits,
same greedy tokens and log-probs as the model's own forward in the engine, for every
architecture feature (GQA, qkv bias, q/k norm, tied head, MiniCPM scalings); it follows
weight updates, and models whose projections are not plain linears keep their own forward."""

from __future__ import annotations

import math

import pytest
import torch

from rlcpm.config import QATConfig
from rlcpm.models import load_model
from rlcpm.models.tiny import build_tiny_model_dir
from rlcpm.quant.export import convert_to_ternary
from rlcpm.quant.qat import prepare_qat
from rlcpm.rollout import Engine, Request, SamplingParams
from rlcpm.rollout.fused_decoder import FusedDecoder, can_fuse
from rlcpm.rollout.fused_linear import FusedLinear
from rlcpm.rollout.packed_linear import CALIBRATION_ROWS, packed_gemm_min_rows

ARCHITECTURES = {
    "llama-tied": dict(model_type="llama", tie_word_embeddings=True, num_key_value_heads=1),
    "qwen2-bias": dict(model_type="qwen2"),
    "qwen3-qk-norm": dict(model_type="qwen3", num_key_value_heads=4),
    "minicpm-scalings": dict(
        model_type="minicpm", scale_emb=12.0, scale_depth=1.4, dim_model_base=16, num_hidden_layers=3
    ),
}


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory):
    dirs = {}
    for index, (name, options) in enumerate(ARCHITECTURES.items()):
        dirs[name] = build_tiny_model_dir(
            tmp_path_factory.mktemp(name), seed=index, init_std=0.1, max_position_embeddings=256, **options
        )
    return dirs


def _engine(path, **kwargs) -> Engine:
    return Engine(
        load_model(str(path)), max_num_seqs=4, max_num_batched_tokens=64, kv_budget_bytes=4 << 20, **kwargs
    )


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_fused_engine_equals_the_model_forward_engine(arch, arch_dirs, prompts):
    fused, plain = _engine(arch_dirs[arch]), _engine(arch_dirs[arch], fused_decoder=False)
    assert isinstance(fused.runner.fused, FusedDecoder) and plain.runner.fused is None
    batch = prompts(n=5, seed=21, max_len=50)  # 64 tokens a step: prefill chunks mixed with decodes
    params = [
        SamplingParams(max_new_tokens=14, temperature=t, seed=s, ignore_eos=True)
        for s, t in enumerate([0, 1, 0.7, 0, 1])
    ]
    requests = [Request(i, p, params[i]) for i, p in enumerate(batch)]
    for got, expected in zip(fused.generate(requests), plain.generate(requests)):
        assert got.token_ids == expected.token_ids
        torch.testing.assert_close(
            torch.tensor(got.logprobs), torch.tensor(expected.logprobs), rtol=0, atol=1e-5
        )


def test_fused_logits_equal_the_full_forward_at_every_position(arch_dirs):
    model = load_model(str(arch_dirs["minicpm-scalings"]))
    engine = Engine(model, max_num_seqs=1, kv_budget_bytes=4 << 20, decode_mirror=False)
    ids = torch.randint(0, model.config.vocab_size, (30,), generator=torch.Generator().manual_seed(3))
    out = engine.generate([ids.tolist()], SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))[0]
    full = ids.tolist() + out.token_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([full]))[0], dim=-1)
    expected = logprobs[len(ids) - 1 : -1].gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert out.token_ids == logprobs[len(ids) - 1 : -1].argmax(-1).tolist()
    torch.testing.assert_close(torch.tensor(out.logprobs), expected, rtol=0, atol=1e-5)


def test_fused_copies_follow_update_weights(arch_dirs, prompts):
    path = arch_dirs["qwen2-bias"]
    engine = _engine(path)
    batch = prompts(n=3, seed=22)
    greedy = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    engine.generate(batch, greedy)
    refreshes = engine.runner.fused.refresh()
    assert refreshes == 0  # nothing changed since the last step
    other = load_model(str(path))
    with torch.no_grad():
        for param in other.parameters():
            param.mul_(-1.0).add_(0.01)
    engine.update_weights([(n, p.detach()) for n, p in other.named_parameters()])
    reference = _engine(path, fused_decoder=False)
    reference.update_weights([(n, p.detach()) for n, p in other.named_parameters()])
    assert [o.token_ids for o in engine.generate(batch, greedy)] == [
        o.token_ids for o in reference.generate(batch, greedy)
    ]


def test_models_with_non_plain_projections_keep_their_own_forward(arch_dirs):
    model = load_model(str(arch_dirs["llama-tied"]))
    assert can_fuse(model)
    prepare_qat(model, QATConfig(group_size=16))
    assert not can_fuse(model)  # BitLinear: the forward uses W_q, not .weight
    convert_to_ternary(model)
    assert not can_fuse(model)  # TernaryLinear: packed codes
    engine = Engine(model, max_num_seqs=2, kv_budget_bytes=4 << 20)
    assert engine.runner.fused is None
    assert math.isfinite(
        engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3, temperature=0))[0].logprobs[0]
    )


@pytest.mark.parametrize("rows", [1, 2, 8, 32, 96])
def test_fused_linear_equals_the_separate_layers_on_both_gemm_paths(rows):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(512, 512, bias=False), torch.nn.Linear(512, 256), torch.nn.Linear(512, 8192)]
    fused = FusedLinear(layers[:2])
    head = FusedLinear(layers[2:])  # large enough to use the packed copy from 2 rows
    x = torch.randn(rows, 512)
    with torch.inference_mode():
        fused.refresh(), head.refresh()
        expected = torch.cat([layers[0](x), layers[1](x)], dim=-1)
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(head(x), layers[2](x), rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            layers[1].bias.add_(1.0)  # an in-place update is picked up by the next refresh
        assert fused.refresh() and not fused.refresh()
        torch.testing.assert_close(fused(x)[:, 512:], layers[1](x), rtol=1e-5, atol=1e-5)


def test_the_packed_gemm_threshold_is_measured_once_per_shape_and_used_by_fused_linears():
    threshold = packed_gemm_min_rows(512, 768, torch.get_num_threads())
    assert threshold in CALIBRATION_ROWS
    assert packed_gemm_min_rows(512, 768, torch.get_num_threads()) == threshold  # cached, not re-measured
    assert packed_gemm_min_rows.cache_info().hits >= 1
    layers = [torch.nn.Linear(512, 512, bias=False), torch.nn.Linear(512, 256)]
    fused = FusedLinear(layers)
    with torch.inference_mode():
        fused.refresh()
    assert fused.packed_weight is not None and fused.packed_min_rows == threshold


# ------------------------------------------------------------------------------------ bfloat16

BF16_LOGPROB_TOL = 0.04  # ~2 bfloat16 steps of a logit of magnitude 4 (2**-6 each)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_bfloat16_fused_engine_agrees_with_the_model_forward_to_bfloat16_rounding(arch, arch_dirs):
    """The bfloat16 fast path (packed bfloat16 GEMMs, float32 decode mirror) scores what the
    model's own bfloat16 forward scores, to bfloat16 rounding: every greedy token is the argmax
    of the full forward up to that rounding, and every log-prob matches it."""
    model = load_model(str(arch_dirs[arch]), dtype=torch.bfloat16)
    engine = Engine(model, max_num_seqs=4, max_num_batched_tokens=64, kv_budget_bytes=4 << 20)
    assert isinstance(engine.runner.fused, FusedDecoder)
    assert engine.runner.decode_backend is not None
    generator = torch.Generator().manual_seed(4)
    batch = [
        torch.randint(0, model.config.vocab_size, (n,), generator=generator).tolist() for n in (30, 9, 41)
    ]
    greedy = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    for prompt, out in zip(batch, engine.generate(batch, greedy)):
        full = prompt + out.token_ids
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([full]))[0].float(), dim=-1)[len(prompt) - 1 : -1]
        chosen = logprobs.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(out.logprobs), chosen, rtol=0, atol=BF16_LOGPROB_TOL)
        assert (logprobs.max(dim=-1).values - chosen).max() <= BF16_LOGPROB_TOL


@pytest.mark.parametrize("rows", [1, 2, 8, 32, 96])
def test_bfloat16_fused_linear_uses_the_packed_copy_at_every_row_count(rows):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(256, 256, bias=False), torch.nn.Linear(256, 64)]
    layers = [layer.to(torch.bfloat16) for layer in layers]
    fused = FusedLinear(layers)
    x = torch.randn(rows, 256, dtype=torch.bfloat16)
    with torch.inference_mode():
        fused.refresh()
        assert fused.packed_weight is not None and fused.weight is None
        expected = torch.cat([layer(x) for layer in layers], dim=-1)
        torch.testing.assert_close(fused(x), expected, rtol=1.6e-2, atol=1e-2)  # 2 bfloat16 steps
