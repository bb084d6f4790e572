"""One decoder definition for the learner and the engine; Hugging Face checkpoints in and out.

    from rlcpm.models import load_model, save_model
    model = load_model(path)                 # model(input_ids [B, T]) -> logits [B, T, V]
    tokenizer = load_tokenizer(path)         # AutoTokenizer, also for configs it cannot parse

See docs/models.md for the forward contract (packed sequences, paged KV cache) and
rlcpm.models.transformer / metadata / kv_cache for the details.
"""

from rlcpm.models.attention import AttentionBackend, get_attention_backend, register_attention_backend
from rlcpm.models.checkpoint import load_model, load_tokenizer, read_config, save_model
from rlcpm.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from rlcpm.models.kv_cache import PagedKVCache
from rlcpm.models.metadata import AttentionMetadata
from rlcpm.models.transformer import CausalLM

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "AttentionBackend",
    "AttentionMetadata",
    "CausalLM",
    "ModelConfig",
    "PagedKVCache",
    "build_tiny_model_dir",
    "build_tokenizer",
    "get_attention_backend",
    "load_model",
    "load_tokenizer",
    "read_config",
    "register_attention_backend",
    "save_model",
]


def __getattr__(name: str):
    # The tiny builders import transformers (seconds); load them only when asked for.
    if name in ("build_tiny_model_dir", "build_tokenizer"):
        from rlcpm.models import tiny

        return getattr(tiny, name)
    raise AttributeError(f"module 'rlcpm.models' has no attribute {name!r}")
