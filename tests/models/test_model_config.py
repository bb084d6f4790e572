"""ModelConfig <-> config.json: transformers 4 and 5 key styles, and clear errors."""

from __future__ import annotations

import pytest

from rlcpm.errors import CheckpointError, EngineError, UnsupportedModelError
from rlcpm.models import AttentionMetadata, ModelConfig, get_attention_backend

BASE = {
    "model_type": "llama",
    "vocab_size": 10,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
}


def test_transformers5_rope_parameters():
    hf = {
        **BASE,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 5e5,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    config = ModelConfig.from_hf(hf)
    assert config.rope_theta == 5e5
    assert config.rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert config.num_key_value_heads == 2 and config.head_dim == 4


def test_transformers4_rope_scaling_with_legacy_type_key():
    config = ModelConfig.from_hf(
        {**BASE, "rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}}
    )
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    default = ModelConfig.from_hf({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}})
    assert default.rope_scaling is None and default.rope_theta == 7.0


def test_to_hf_roundtrip_keeps_unknown_keys():
    config = ModelConfig.from_hf(
        {**BASE, "model_type": "qwen3", "custom_key": [1, 2], "torch_dtype": "bfloat16"}
    )
    out = config.to_hf()
    assert out["custom_key"] == [1, 2] and out["torch_dtype"] == "bfloat16"
    assert out["architectures"] == ["Qwen3ForCausalLM"]
    assert ModelConfig.from_hf(out) == config


@pytest.mark.parametrize(
    "change,error,pattern",
    [
        (
            {"model_type": "mamba"},
            UnsupportedModelError,
            r"config\.json: model_type 'mamba' is not supported; supported: llama",
        ),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}, UnsupportedModelError, r"'dynamic'"),
        ({"use_sliding_window": True}, UnsupportedModelError, "use_sliding_window"),
        ({"hidden_act": "gelu"}, UnsupportedModelError, "gelu"),
        ({"num_key_value_heads": 3, "num_attention_heads": 4}, CheckpointError, "multiple of"),
        ({"torch_dtype": "int8"}, CheckpointError, "int8"),
        # were a ZeroDivisionError, and a shape error in the first forward's RoPE
        ({"num_key_value_heads": 0}, CheckpointError, r"num_key_value_heads \(0\) must be positive"),
        ({"head_dim": 5}, CheckpointError, r"head_dim \(5\) must be even"),
        # were an AttributeError / a ValueError from dict() naming neither the file nor the key
        ({"rope_scaling": "linear"}, CheckpointError, r"config\.json: rope_scaling must be an object"),
        ({"rope_parameters": [10000.0]}, CheckpointError, r"config\.json: rope_parameters must be an object"),
        # a string "false" was truthy: tied embeddings from a config that says untied
        ({"tie_word_embeddings": "false"}, CheckpointError, r"tie_word_embeddings must be true or false"),
        ({"hidden_size": 64.0}, CheckpointError, r"hidden_size must be an integer, got 64\.0"),
    ],
)
def test_bad_configs(change, error, pattern):
    with pytest.raises(error, match=pattern):
        ModelConfig.from_hf({**BASE, **change})


def test_missing_required_key_is_named():
    hf = dict(BASE)
    del hf["hidden_size"]
    with pytest.raises(CheckpointError, match="hidden_size"):
        ModelConfig.from_hf(hf, source="/ckpt/config.json")


def test_unknown_attention_backend_lists_available():
    with pytest.raises(
        UnsupportedModelError,
        match=r"'flash' is not registered; available: \['dense', 'reference', 'sparse'\]",
    ):
        get_attention_backend("flash")


def test_paged_metadata_needs_all_three_fields():
    import torch

    with pytest.raises(EngineError, match="context_lens=set, slot_mapping=None"):
        AttentionMetadata(cu_seqlens_q=torch.tensor([0, 2]), context_lens=torch.tensor([2]))


def test_a_null_rope_theta_takes_the_default_like_transformers():
    assert ModelConfig.from_hf({**BASE, "rope_theta": None}).rope_theta == 10000.0
    nested = {**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
    nested.pop("rope_theta", None)
    assert ModelConfig.from_hf(nested).rope_theta == 500000.0
    assert ModelConfig.from_hf({**nested, "rope_theta": None}).rope_theta == 500000.0
