"""Parity with transformers (the oracle) for llama, qwen2, qwen3, both directions of checkpoint exchange."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rlcpm.errors import UnsupportedModelError
from rlcpm.models import ModelConfig, load_model, save_model

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
LINEAR = {"rope_type": "linear", "factor": 4.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
YARN_MSCALE = {**YARN, "beta_fast": 8, "beta_slow": 2, "mscale": 0.8, "mscale_all_dim": 0.5, "truncate": False}

# (model_type, num_key_value_heads (GQA ratio 4 / num_kv), tied, rope_scaling, extra config)
CASES = [
    ("llama", 4, False, None, {}),
    ("llama", 2, True, LLAMA3, {}),
    ("llama", 1, False, LINEAR, {"attention_bias": True, "mlp_bias": True}),
    ("qwen2", 2, False, None, {}),
    ("qwen2", 4, True, None, {"rope_theta": 1e6}),
    ("qwen3", 1, False, None, {}),
    ("qwen3", 2, True, None, {"head_dim": 32}),
    ("qwen3", 2, False, YARN, {"head_dim": 32}),
    ("qwen2", 2, False, YARN_MSCALE, {}),
]


def _case_id(case) -> str:
    model_type, kv, tied, rope, extra = case
    rope_name = (rope or {}).get("rope_type", "default")
    return f"{model_type}-gqa{4 // kv}-{'tied' if tied else 'untied'}-{rope_name}" + "".join(
        f"-{k}" for k in extra
    )


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_save_model_then_transformers_gives_same_logits(case, make_model, random_ids, tmp_path):
    model_type, kv, tied, rope, extra = case
    model = make_model(
        model_type, num_key_value_heads=kv, tie_word_embeddings=tied, rope_scaling=rope, **extra
    )
    save_model(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.config.model_type == model_type
    ids = random_ids(2, 37)
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == (2, 37, 96)
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert ours.abs().max().item() > 1.0  # the comparison is not between two near-zero tensors
    if tied:
        assert "lm_head.weight" not in _safetensor_names(tmp_path)  # no duplicate, as HF saves


def _safetensor_names(path):
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("rope", [LLAMA3, LINEAR, YARN], ids=["llama3", "linear", "yarn"])
def test_rope_scaling_changes_the_logits(rope, make_model, random_ids):
    """Guards the parity test: the scaling is really applied (by both implementations)."""
    ids = random_ids(1, 40)
    with torch.no_grad():
        plain = make_model("llama", rope_scaling=None)(ids)
        scaled = make_model("llama", rope_scaling=rope)(ids)
    assert (plain - scaled).abs().max().item() > 1e-2


@pytest.mark.parametrize(
    "model_type,tied,shard,rope",
    [("llama", False, True, LLAMA3), ("qwen2", True, True, None), ("qwen3", False, False, None)],
)
def test_transformers_save_then_load_model_gives_same_logits(
    model_type, tied, shard, rope, random_ids, tmp_path
):
    config = AutoConfig.for_model(
        model_type,
        rope_scaling=rope,
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("bias") or name.endswith("norm.weight"):
                param.add_(0.2 * torch.randn_like(param))
    hf.save_pretrained(tmp_path, max_shard_size="40KB" if shard else "1GB")
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    model = load_model(tmp_path)
    assert model.config.model_type == model_type and not model.training
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids = random_ids(2, 29)
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-5


def test_load_model_casts_dtype(make_model, random_ids, tmp_path):
    model = make_model("qwen3")
    save_model(model, tmp_path)
    bf16 = load_model(tmp_path, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16 and bf16.config.torch_dtype == torch.bfloat16
    assert bf16.model.rotary_emb.inv_freq.dtype == torch.float32
    ids = random_ids(1, 12)
    with torch.no_grad():
        ref, low = model(ids), bf16(ids).float()
    # bfloat16 keeps 8 mantissa bits: same logits up to a few percent of their scale.
    assert (ref - low).abs().max().item() < 0.05 * ref.abs().max().item()


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_longrope_outside_minicpm_is_refused(model_type):
    """rlcpm's longrope is MiniCPM4's (one factor table for the whole cache); transformers' longrope
    for these types picks short or long factors per forward from the sequence length and scales
    differently, so the logits would differ (by 0.5 on a tiny llama): refused, not silently wrong."""
    longrope = {
        "rope_type": "longrope",
        "short_factor": [1.0] * 8,
        "long_factor": [4.0] * 8,
        "original_max_position_embeddings": 64,
    }
    hf = {
        "model_type": model_type,
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 256,
        "rope_scaling": longrope,
    }
    with pytest.raises(UnsupportedModelError, match=rf"longrope.*{model_type}.*minicpm"):
        ModelConfig.from_hf(hf)
    assert ModelConfig.from_hf({**hf, "model_type": "minicpm"}).rope_scaling["rope_type"] == "longrope"
