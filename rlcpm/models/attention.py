"""Self-attention: projections, q/k norm, RoPE, and a pluggable attention backend.

The `Attention` module owns the parameters (HF names `q_proj, k_proj, v_proj, o_proj` and,
for Qwen3, `q_norm, k_norm`); the softmax(QK^T)V part is delegated to an `AttentionBackend`
chosen by name from a registry, so InfLLM v2 sparse attention plugs in with
`register_attention_backend("sparse", SparseAttention)` and `ModelConfig.attention = "sparse"`,
without touching the model code.

Backend interface::

    backend = get_attention_backend(name)(config)          # one instance per model
    out = backend.forward(q, k, v, meta, layer_idx, kv_cache)
    # q [T, Hq, D], k/v [T, Hkv, D] after RoPE (and q/k norm); out [T, Hq, D]

With `kv_cache` set, the backend first stores k/v at `meta.slot_mapping`, then attends
over the cached keys of each sequence (see rlcpm.models.metadata for the visibility rule).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import nn

from rlcpm.errors import UnsupportedModelError
from rlcpm.models.layers import RMSNorm
from rlcpm.models.metadata import AttentionMetadata
from rlcpm.models.rope import apply_rotary

if TYPE_CHECKING:
    from rlcpm.models.config import ModelConfig
    from rlcpm.models.kv_cache import PagedKVCache


class AttentionBackend(ABC):
    """softmax(q k^T / sqrt(D)) v over the keys each query may see; holds no parameters."""

    # Whether packed training metadata may carry shared prefixes (AttentionMetadata.prefix_seq).
    supports_shared_prefix: bool = False

    def __init__(self, config: ModelConfig):
        self.config = config
        self.scale = config.head_dim**-0.5

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        layer_idx: int,
        kv_cache: PagedKVCache | None,
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""


_BACKENDS: dict[str, type[AttentionBackend]] = {}
# Built-in backends whose module is imported on first use (keeps rlcpm.kernels out of plain imports).
_BUILTIN_MODULES = {"sparse": "rlcpm.models.sparse_attention"}


def register_attention_backend(name: str, backend: type[AttentionBackend]) -> type[AttentionBackend]:
    """Make `backend` selectable as `ModelConfig.attention = name` (re-registering replaces)."""
    _BACKENDS[name] = backend
    return backend


def get_attention_backend(name: str) -> type[AttentionBackend]:
    if name not in _BACKENDS and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])  # registers itself
    if name not in _BACKENDS:
        raise UnsupportedModelError(
            f"attention backend {name!r} is not registered; available: {available_attention_backends()}. "
            "A backend module registers itself with "
            "rlcpm.models.attention.register_attention_backend(name, cls) when imported."
        )
    return _BACKENDS[name]


def available_attention_backends() -> list[str]:
    return sorted(set(_BACKENDS) | set(_BUILTIN_MODULES))


class Attention(nn.Module):
    """Grouped-query self-attention of one decoder layer over packed tokens [T, hidden]."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(hidden, self.num_heads * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, hidden, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.backend: AttentionBackend | None = None  # set by the decoder (shared instance)

    def forward(
        self,
        hidden: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        kv_cache: PagedKVCache | None = None,
    ) -> torch.Tensor:
        """hidden [T, hidden], rope = (cos, sin) [T, D] -> [T, hidden]."""
        num_tokens = hidden.shape[0]
        q = self.q_proj(hidden).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if meta.prefix_seq is not None and not self.backend.supports_shared_prefix:
            raise UnsupportedModelError(
                f"attention backend {type(self.backend).__name__} cannot attend over shared prefixes "
                "(AttentionMetadata.prefix_seq); pack each sequence with its own prompt"
            )
        out = self.backend.forward(q, k, v, meta, self.layer_idx, kv_cache)  # [T, Hq, D]
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))
