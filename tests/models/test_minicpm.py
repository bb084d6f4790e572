"""MiniCPM: neutral scalings equal the llama path; each muP scaling and longrope checked on its own."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlcpm.models import ModelConfig, load_model, save_model
from rlcpm.models.rope import RotaryEmbedding

LAYERS, HIDDEN = 3, 64


def _pair(make_model, **minicpm):
    """A llama model and a minicpm model with the same weights (default rope for both)."""
    llama = make_model("llama", num_hidden_layers=LAYERS)
    neutral = {
        "scale_emb": 1.0,
        "scale_depth": math.sqrt(LAYERS),
        "dim_model_base": HIDDEN,
        "rope_scaling": {"rope_type": "default"},
    }
    cpm = make_model("minicpm", num_hidden_layers=LAYERS, **{**neutral, **minicpm})
    cpm.load_state_dict(llama.state_dict())
    return llama, cpm


def test_neutral_scalings_equal_llama_exactly(make_model, random_ids):
    llama, cpm = _pair(make_model)
    ids = random_ids(2, 21)
    with torch.no_grad():
        assert torch.equal(llama(ids), cpm(ids))


def test_scale_emb_multiplies_the_embeddings(make_model, random_ids):
    llama, cpm = _pair(make_model, scale_emb=12.0)
    with torch.no_grad():
        llama.model.embed_tokens.weight.mul_(12.0)  # untied: the head keeps its own weights
        ids = random_ids(2, 15)
        torch.testing.assert_close(cpm(ids), llama(ids), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(cpm(ids), _pair(make_model)[1](ids), atol=1e-3)


def test_scale_depth_scales_every_residual_branch(make_model, random_ids):
    """h + f(h) * d/sqrt(L) is llama with o_proj and down_proj (the last linear of each branch)
    multiplied by d/sqrt(L)."""
    llama, cpm = _pair(make_model, scale_depth=1.4)
    factor = 1.4 / math.sqrt(LAYERS)
    with torch.no_grad():
        for layer in llama.model.layers:
            layer.self_attn.o_proj.weight.mul_(factor)
            layer.mlp.down_proj.weight.mul_(factor)
        ids = random_ids(2, 15)
        torch.testing.assert_close(cpm(ids), llama(ids), atol=1e-5, rtol=1e-5)


def test_dim_model_base_divides_the_final_hidden_state(make_model, random_ids):
    llama, cpm = _pair(make_model, dim_model_base=16)
    ids = random_ids(2, 15)
    with torch.no_grad():
        torch.testing.assert_close(cpm(ids), llama(ids) / (HIDDEN / 16), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(
            cpm(ids, return_hidden=True), llama(ids, return_hidden=True) / 4.0, atol=1e-7, rtol=1e-6
        )


def _longrope_reference(head_dim, base, scaling, max_position_embeddings, seq_len):
    """MiniCPMLongRoPE._set_cos_sin_cache, written out from the formula of modeling_minicpm.py."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    original = scaling["original_max_position_embeddings"]
    scale = max_position_embeddings / original
    scaling_factor = math.sqrt(1 + math.log(scale) / math.log(original))
    # The cache is built for max_position_embeddings tokens, so that length picks the table.
    factors = scaling["long_factor"] if max_position_embeddings > original else scaling["short_factor"]
    t = torch.arange(seq_len).float()
    freqs = torch.outer(t, 1.0 / torch.tensor(factors, dtype=torch.float32)) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling_factor, emb.sin() * scaling_factor


@pytest.mark.parametrize(
    "max_pos,original",
    [(64, 64), (256, 64), (32, 64)],
    ids=["short-table", "long-table", "max-below-original"],  # the last: amplitude sqrt(1 - 1/6) < 1
)
def test_longrope_matches_the_minicpm_formula(max_pos, original):
    head_dim = 16
    scaling = {
        "rope_type": "longrope",
        "short_factor": torch.linspace(1.0, 1.3, head_dim // 2).tolist(),
        "long_factor": torch.linspace(1.0, 9.0, head_dim // 2).tolist(),
        "original_max_position_embeddings": original,
    }
    rope = RotaryEmbedding(head_dim, 10000.0, scaling, max_pos)
    cos, sin = rope(torch.arange(max_pos))
    ref_cos, ref_sin = _longrope_reference(head_dim, 10000.0, scaling, max_pos, max_pos)
    torch.testing.assert_close(cos, ref_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, ref_sin, atol=1e-6, rtol=0)
    if max_pos > original:
        assert rope.amplitude == pytest.approx(math.sqrt(1 + math.log(4) / math.log(64)))


def test_minicpm_roundtrip_keeps_config_and_logits(make_model, random_ids, tmp_path):
    sparse = {"kernel_size": 32, "kernel_stride": 16, "block_size": 64, "topk": 64, "dense_len": 8192}
    model = make_model("minicpm", sparse_config=sparse)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    config = loaded.config
    assert (config.scale_emb, config.scale_depth, config.dim_model_base) == (12.0, 1.4, 16)
    assert config.rope_scaling["rope_type"] == "longrope" and config.sparse_config == sparse
    ids = random_ids(2, 11)
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))


def test_minicpm4_config_json_parses():
    """The keys of MiniCPM4's config.json (sparse_config, longrope with `rope_type`, muP)."""
    head_dim = 128
    hf = {
        "architectures": ["MiniCPMForCausalLM"],
        "model_type": "minicpm",
        "vocab_size": 73448,
        "hidden_size": 4096,
        "intermediate_size": 16384,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "rope_type": "longrope",
            "long_factor": [1.0] * (head_dim // 2),
            "short_factor": [1.0] * (head_dim // 2),
            "original_max_position_embeddings": 32768,
        },
        "scale_emb": 12,
        "scale_depth": 1.4,
        "dim_model_base": 256,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "sparse_config": {
            "kernel_size": 32,
            "kernel_stride": 16,
            "init_blocks": 1,
            "block_size": 64,
            "window_size": 2048,
            "topk": 64,
            "use_nope": False,
            "dense_len": 8192,
        },
        "auto_map": {"AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM"},
    }
    config = ModelConfig.from_hf(hf)
    assert config.head_dim == 128 and config.num_key_value_heads == 2
    assert config.residual_scale == pytest.approx(1.4 / math.sqrt(32))
    assert config.logit_scale_divisor == 16.0
    assert config.sparse_config["topk"] == 64 and config.torch_dtype == torch.bfloat16
    out = config.to_hf()
    assert out["auto_map"] == hf["auto_map"] and out["sparse_config"] == hf["sparse_config"]
    assert ModelConfig.from_hf(out) == config


def test_absent_mup_and_tying_keys_take_the_minicpm_config_defaults(make_model, random_ids, tmp_path):
    """configuration_minicpm.py defaults scale_emb, scale_depth and dim_model_base to 1 and
    tie_word_embeddings to True, and modeling_minicpm.py always applies scale_depth / sqrt(L)
    and hidden / (hidden_size / dim_model_base): a config.json without these keys means that."""
    cpm = make_model(
        "minicpm",
        num_hidden_layers=LAYERS,
        tie_word_embeddings=True,
        scale_emb=1.0,
        scale_depth=1.0,
        dim_model_base=1,
    )
    save_model(cpm, tmp_path)
    config_file = tmp_path / "config.json"
    hf = json.loads(config_file.read_text())
    for key in ("scale_emb", "scale_depth", "dim_model_base", "tie_word_embeddings"):
        del hf[key]
    config_file.write_text(json.dumps(hf))
    loaded = load_model(tmp_path)  # the file has no lm_head.weight: the head is the embedding
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.config.residual_scale == pytest.approx(1 / math.sqrt(LAYERS))
    assert loaded.config.logit_scale_divisor == HIDDEN
    ids = random_ids(2, 13)
    with torch.no_grad():
        assert torch.equal(cpm(ids), loaded(ids))
    unset = ModelConfig(model_type="minicpm", hidden_size=64, num_attention_heads=4, num_hidden_layers=4)
    assert (unset.residual_scale, unset.logit_scale_divisor) == (0.5, 64.0)
    assert ModelConfig.from_hf(unset.to_hf()) == unset
