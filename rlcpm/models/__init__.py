"""One decoder definition for the learner and the engine; Hugging Face checkpoints in and out.

    from rlcpm.models import load_model, save_model
    model = load_model(path)                 # model(input_ids [B, T]) -> logits [B, T, V]

See docs/models.md for the forward contract (packed sequences, paged KV cache) and
rlcpm.models.transformer / metadata / kv_cache for the details.
"""

from rlcpm.models.attention import AttentionBackend, get_attention_backend, register_attention_backend
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
    "get_attention_backend",
    "register_attention_backend",
]
