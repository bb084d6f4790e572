"""Tiny random-weight models with a real tokenizer, as Hugging Face directories (tests, quickstart).

    path = build_tiny_model_dir(tmp_path / "tiny", model_type="qwen3", num_hidden_layers=2)
    model = rlcpm.models.load_model(path)                  # or AutoModelForCausalLM (llama/qwen*)
    tokenizer = rlcpm.models.load_tokenizer(path)          # AutoTokenizer; minicpm too

The directory holds config.json, model.safetensors, generation_config.json, tokenizer.json,
tokenizer_config.json (with the ChatML chat template), chat_template.jinja and
special_tokens_map.json. Everything is built offline and seeded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from rlcpm.errors import CheckpointError
from rlcpm.models.checkpoint import save_model
from rlcpm.models.config import ModelConfig
from rlcpm.models.tiny_tokenizer import (
    CHATML_TEMPLATE,
    ENDOFTEXT_TOKEN,
    build_tokenizer,
    train_bpe_tokenizer,
)
from rlcpm.models.transformer import CausalLM

__all__ = [
    "CHATML_TEMPLATE",
    "build_tiny_model",
    "build_tiny_model_dir",
    "build_tokenizer",
    "save_tokenizer",
    "tiny_config",
    "train_bpe_tokenizer",
]


def tiny_config(
    model_type: str = "llama",
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
    rope_scaling: dict | None = None,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> ModelConfig:
    """A small ModelConfig. MiniCPM gets MiniCPM4-like muP scalings (scale_emb=12,
    scale_depth=1.4, dim_model_base=hidden/4) and a longrope rotary unless overridden."""
    fields: dict[str, Any] = {}
    if model_type == "minicpm":
        head_dim = overrides.get("head_dim") or hidden_size // num_attention_heads
        fields.update(scale_emb=12.0, scale_depth=1.4, dim_model_base=max(1, hidden_size // 4))
        if rope_scaling is None:
            rope_scaling = {
                "rope_type": "longrope",
                "short_factor": torch.linspace(1.0, 1.5, head_dim // 2).tolist(),
                "long_factor": torch.linspace(1.0, 4.0, head_dim // 2).tolist(),
                "original_max_position_embeddings": max_position_embeddings,
            }
    fields.update(overrides)
    return ModelConfig(
        model_type=model_type,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        rope_scaling=rope_scaling,
        torch_dtype=dtype,
        **fields,
    )


def build_tiny_model(config: ModelConfig, seed: int = 0, init_std: float | None = None) -> CausalLM:
    """A CausalLM with seeded N(0, init_std^2) weights (init_std defaults to initializer_range)."""
    model = CausalLM(config).to(config.torch_dtype)
    model.init_weights(std=init_std, seed=seed)
    return model.eval()


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, path: str | Path) -> Path:
    """save_pretrained, plus the chat template inside tokenizer_config.json and a
    special_tokens_map.json, so transformers 4.x and 5.x both load it."""
    path = Path(path)
    tokenizer.save_pretrained(path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = tokenizer.chat_template
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        config["additional_special_tokens"] = extra
    config.pop("backend", None)
    config_file.write_text(json.dumps(config, indent=2))
    special = {"eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token}
    special["additional_special_tokens"] = config.get("additional_special_tokens", [])
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return path


def build_tiny_model_dir(
    path: str | Path,
    model_type: str = "llama",
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int | None = None,
    tokenizer_vocab_size: int = 512,
    extra_words: Iterable[str] = (),
    tokenizer: PreTrainedTokenizerBase | None = None,
    tie_word_embeddings: bool = False,
    rope_scaling: dict | None = None,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    init_std: float | None = None,
    dtype: torch.dtype = torch.float32,
    **config_overrides: Any,
) -> Path:
    """Write a tiny HF model directory with a real tokenizer; returns the path.

    vocab_size: embedding rows, default len(tokenizer) (must be >= it). The tokenizer is
    `tokenizer` if given, else `build_tokenizer(tokenizer_vocab_size, extra_words)`.
    config_overrides: any other ModelConfig field (head_dim, attention_bias, rope_theta,
    scale_emb, scale_depth, dim_model_base, sparse_config, initializer_range, ...).
    """
    tokenizer = tokenizer or build_tokenizer(tokenizer_vocab_size, extra_words=extra_words)
    vocab_size = vocab_size or len(tokenizer)
    if vocab_size < len(tokenizer):
        raise CheckpointError(
            f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens"
        )
    eos_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(ENDOFTEXT_TOKEN)]
    config_overrides.setdefault("eos_token_id", eos_ids[0])
    config_overrides.setdefault("pad_token_id", tokenizer.pad_token_id)
    config = tiny_config(
        model_type,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        rope_scaling=rope_scaling,
        dtype=dtype,
        **config_overrides,
    )
    path = Path(path)
    save_model(build_tiny_model(config, seed=seed, init_std=init_std), path)
    generation = json.loads((path / "generation_config.json").read_text())
    generation["eos_token_id"] = eos_ids  # stop on <|im_end|> and <|endoftext|>
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2))
    save_tokenizer(tokenizer, path)
    return path
