"""Fixtures for the engine tests: tiny HF model directories (llama, qwen2, qwen3) with a real
tokenizer and non-trivial weights, engines over them, and the transformers oracle."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny models are latency-bound: one intra-op thread avoids OpenMP spin-waits on a shared
    2-core machine. Restored after each test."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """model_type -> HF directory. Weights ~ N(0, 0.1^2) with random norm weights and biases, so
    logits are well separated (greedy parity is meaningful) and every bias/norm path counts."""
    from safetensors.torch import load_file, save_file

    from rlcpm.models.tiny import build_tiny_model_dir

    dirs = {}
    for index, model_type in enumerate(("llama", "qwen2", "qwen3")):
        path = build_tiny_model_dir(
            tmp_path_factory.mktemp(model_type),
            model_type,
            seed=index,
            init_std=0.1,
            max_position_embeddings=256,
        )
        tensors = load_file(str(path / "model.safetensors"))
        generator = torch.Generator().manual_seed(100 + index)
        for name, tensor in tensors.items():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                tensor.add_(0.2 * torch.randn(tensor.shape, generator=generator))
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        dirs[model_type] = path
    return dirs


@pytest.fixture
def make_engine(tiny_dirs):
    """make_engine(model_type="llama", **engine_kwargs) -> a float32 CPU Engine."""
    from rlcpm.rollout import Engine

    def make(model_type: str = "llama", **kwargs):
        kwargs.setdefault("kv_budget_bytes", 4 * 1024**2)
        return Engine.from_pretrained(str(tiny_dirs[model_type]), dtype="float32", **kwargs)

    return make


@pytest.fixture(scope="session")
def hf_models(tiny_dirs):
    """model_type -> transformers model (eval, float32) that never stops at EOS."""
    from transformers import AutoModelForCausalLM

    models = {}
    for model_type, path in tiny_dirs.items():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None
        models[model_type] = model
    return models


@pytest.fixture
def hf_greedy(hf_models):
    """hf_greedy(model_type, prompt_ids, max_new_tokens) -> new token ids from HF `generate`."""

    def generate(model_type: str, prompt: list[int], max_new_tokens: int) -> list[int]:
        model = hf_models[model_type]
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        return out[0, len(prompt) :].tolist()

    return generate


@pytest.fixture
def prompts():
    """prompts(n, vocab, seed, min_len, max_len) -> random prompt token id lists of mixed lengths."""

    def make(
        n: int = 8, vocab: int = 512, seed: int = 0, min_len: int = 1, max_len: int = 40
    ) -> list[list[int]]:
        generator = torch.Generator().manual_seed(seed)
        lens = torch.randint(min_len, max_len + 1, (n,), generator=generator).tolist()
        return [torch.randint(0, vocab, (n_tokens,), generator=generator).tolist() for n_tokens in lens]

    return make


@pytest.fixture
def pool_recipe(tiny_dirs, tmp_path):
    """pool_recipe(rollout={...}, **sections) -> a GRPO recipe over the tiny llama for a RolloutPool
    (float32 on the CPU, a 10 MB KV budget, no wandb)."""
    from rlcpm.config import load_recipe

    def make(rollout: dict, **sections):
        return load_recipe(
            data={
                "run_dir": str(tmp_path / "run"),
                "model": {"path": str(tiny_dirs["llama"]), "dtype": "float32", "device": "cpu"},
                "data": {"train": {"task": "arithmetic", "num_samples": 8}},
                "rewards": [{"name": "math"}],
                "rollout": {"n_samples": 2, "kv_budget_gb": 0.01, **rollout},
                "logging": {"wandb": {"mode": "disabled"}, "progress": False},
                **sections,
            }
        )

    return make
