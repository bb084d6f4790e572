"""Fixtures for rlcpm.models tests: tiny configs/models with non-trivial weights."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny models are latency-bound: one intra-op thread avoids OpenMP spin-waits on a shared
    2-core machine (100x faster for [3, 64] matmuls under load). Restored after each test."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def make_model():
    """make_model(model_type, seed=0, **config) -> CausalLM in eval mode, float32.

    Weights ~ N(0, 0.1^2) and, unlike a fresh init, norm weights and biases are random too,
    so a bug in a bias or norm path shows up in every comparison.
    """
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


@pytest.fixture
def random_ids():
    """random_ids(*shape, vocab=96, seed=0) -> int64 token ids."""

    def make(*shape: int, vocab: int = 96, seed: int = 0) -> torch.Tensor:
        return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))

    return make


@pytest.fixture(scope="session")
def tokenizer():
    from rlcpm.models.tiny import build_tokenizer

    return build_tokenizer()
