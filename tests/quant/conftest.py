"""Fixtures for rlcpm.quant tests: tiny models with non-trivial weights, a tiny HF directory."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny models are latency-bound; one intra-op thread avoids OpenMP spin on a shared 2-core box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def make_model():
    """make_model(model_type="llama", seed=0, **config) -> float32 CausalLM with N(0, 0.1^2) weights
    and random norm weights / biases (so a dropped bias or scale shows up in every comparison)."""
    from rlcpm.models.tiny import build_tiny_model, tiny_config

    def make(model_type: str = "llama", seed: int = 0, **config):
        config.setdefault("vocab_size", 96)
        model = build_tiny_model(tiny_config(model_type, **config), seed=seed, init_std=0.1)
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight") or name.endswith(".bias"):
                    param.add_(0.2 * torch.randn(param.shape, generator=generator))
        return model

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer llama (hidden 64) with the real tiny BPE tokenizer, as a HF directory."""
    from rlcpm.models.tiny import build_tiny_model_dir

    return build_tiny_model_dir(
        tmp_path_factory.mktemp("quant") / "tiny",
        hidden_size=64,
        intermediate_size=128,
        seed=0,
        init_std=0.05,
    )
