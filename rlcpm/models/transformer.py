"""The decoder: one definition used by the learner (packed training) and the engine (paged KV).

Parameter names are Hugging Face's (`model.embed_tokens`, `model.layers.{i}.self_attn.q_proj`,
`...mlp.gate_proj`, `...input_layernorm`, `model.norm`, `lm_head`), so checkpoints map 1:1
and peft LoRA targets are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.

Forward contract (`CausalLM.forward`)::

    model(input_ids [B, T]) -> logits [B, T, V]                  plain causal batch, no padding

    model(ids [T], positions [T], meta=AttentionMetadata.packed(lens))        packed training:
        -> logits [T, V]; attention is causal within each sequence; positions restart at 0

    model(ids [T], positions [T], meta=paged_meta, kv_cache=cache)     engine step over new tokens:
        -> logits [T, V]; K/V of the new tokens are written at meta.slot_mapping first

    return_hidden=True returns the final hidden states [.., H] instead of logits: after the
    last RMSNorm AND after MiniCPM's division by hidden_size / dim_model_base, so
    `model.compute_logits(hidden)` (= `model.lm_head`, tied or not) gives the logits.

MiniCPM scalings (SPECS §6): embeddings * scale_emb; each residual branch
* scale_depth / sqrt(L); final hidden / (hidden_size / dim_model_base).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import rlcpm.models.dense_attention  # noqa: F401  (registers the "dense" and "reference" backends)
from rlcpm.errors import EngineError
from rlcpm.models.attention import Attention, get_attention_backend
from rlcpm.models.config import ModelConfig
from rlcpm.models.kv_cache import PagedKVCache
from rlcpm.models.layers import RMSNorm, SwiGLU
from rlcpm.models.metadata import AttentionMetadata
from rlcpm.models.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    """Pre-norm block: h += attn(norm(h)) * r; h += mlp(norm(h)) * r (r = 1 except MiniCPM)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.residual_scale = config.residual_scale

    def forward(self, hidden, rope, meta, kv_cache=None):
        attn = self.self_attn(self.input_layernorm(hidden), rope, meta, kv_cache)
        hidden = hidden + (attn if self.residual_scale == 1.0 else attn * self.residual_scale)
        mlp = self.mlp(self.post_attention_layernorm(hidden))
        return hidden + (mlp if self.residual_scale == 1.0 else mlp * self.residual_scale)


class DecoderModel(nn.Module):
    """Embeddings, decoder layers and the final norm (HF's `model.*`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.rope_theta, config.rope_scaling, config.max_position_embeddings
        )


class CausalLM(nn.Module):
    """Decoder-only language model: `model` (DecoderModel) + `lm_head` (nn.Linear, maybe tied)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.gradient_checkpointing = False
        self.set_attention_backend(config.attention)

    # ------------------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        *,
        meta: AttentionMetadata | None = None,
        kv_cache: PagedKVCache | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits [.., V] (or final hidden [.., H] with return_hidden); see the module docstring."""
        batch_shape = input_ids.shape
        if input_ids.dim() == 2:
            if meta is not None or kv_cache is not None:
                raise EngineError("a [B, T] input_ids batch takes no meta/kv_cache; pass packed [T] tokens")
            num_seqs, seq_len = batch_shape
            meta = AttentionMetadata.packed([seq_len] * num_seqs, device=input_ids.device)
            if positions is None:
                positions = torch.arange(seq_len, device=input_ids.device).repeat(num_seqs)
            input_ids, positions = input_ids.reshape(-1), positions.reshape(-1)
        elif input_ids.dim() != 1:
            raise EngineError(f"input_ids must be [B, T] or packed [T], got shape {tuple(batch_shape)}")
        if kv_cache is not None and (meta is None or not meta.has_cache or positions is None):
            raise EngineError(
                "a kv_cache forward needs positions and meta with context_lens/slot_mapping/block_tables"
            )
        if meta is None:
            meta = AttentionMetadata.packed([input_ids.numel()], device=input_ids.device)
        if positions is None:
            positions = meta.default_positions()

        hidden = self._hidden_states(input_ids, positions, meta, kv_cache)
        out = hidden if return_hidden else self.compute_logits(hidden)
        return out.view(*batch_shape, out.shape[-1])

    def _hidden_states(self, input_ids, positions, meta, kv_cache) -> torch.Tensor:
        config = self.config
        hidden = self.model.embed_tokens(input_ids)  # [T, H]
        if config.scale_emb != 1.0:
            hidden = hidden * config.scale_emb
        rope = self.model.rotary_emb(positions)  # (cos, sin) [T, D]
        use_checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.model.layers:
            if use_checkpointing:
                hidden = checkpoint(layer, hidden, rope, meta, kv_cache, use_reentrant=False)
            else:
                hidden = layer(hidden, rope, meta, kv_cache)
        hidden = self.model.norm(hidden)
        if config.logit_scale_divisor != 1.0:
            hidden = hidden / config.logit_scale_divisor
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head: hidden [.., H] (as returned with return_hidden=True) -> logits [.., V]."""
        return self.lm_head(hidden)

    # ----------------------------------------------------------------------------- helpers

    def tie_weights(self) -> None:
        """Share one Parameter between lm_head and embed_tokens when tie_word_embeddings."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_attention_backend(self, name: str) -> None:
        """Switch every layer to the registered attention backend `name` (no parameters change)."""
        backend = get_attention_backend(name)(self.config)
        self.config.attention = name
        self.attention_backend = backend
        for layer in self.model.layers:
            layer.self_attn.backend = backend

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each decoder layer in backward (non-reentrant torch.utils.checkpoint)."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def new_kv_cache(
        self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None
    ) -> PagedKVCache:
        """A PagedKVCache shaped for this model, on its device (dtype defaults to the model's)."""
        return PagedKVCache.for_model(
            self.config, num_blocks, block_size, dtype=dtype or self.dtype, device=self.device
        )

    @torch.no_grad()
    def init_weights(self, std: float | None = None, seed: int | None = None) -> None:
        """Random init: linear/embedding weights ~ N(0, std^2) (default initializer_range),
        biases 0, norm weights 1. Seeded through a private generator when `seed` is given."""
        std = self.config.initializer_range if std is None else std
        generator = torch.Generator(device="cpu")
        generator.manual_seed(torch.initial_seed() if seed is None else seed)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
                param.copy_(values.to(param.dtype))
