"""The engine's forward of a built CausalLM with fewer, larger operations (CPU fast path).

The learner's model code runs every projection, norm and rotation as its own small operator;
during decoding (a few dozen tokens per step) each operator costs more in dispatch than in
arithmetic. ``FusedDecoder(model)`` is a transformation applied to a built model, in the
spirit of rlcpm.rollout.packed_linear: it reads the model's modules (never modifies them) and
runs the same computation per decoder layer as

    h   = rms_norm(x) * w_in                               (torch.nn.functional.rms_norm)
    qkv = h [Wq; Wk; Wv]^T (+ b)                           one GEMM (FusedLinear)
    q,k = rope([q | k])                                    q/k norm first (Qwen3); one rotation
                                                           for all heads with cos/sin gathered
                                                           once per step for every layer
    x  += r * o_proj(attention(q, k, v))                   the model's attention backend
    x  += r * down(silu(g) * u),  [g | u] = rms_norm(x) * w_post [Wg; Wu]^T   one GEMM

(r = 1 except MiniCPM), then the final norm on the sampled rows only and the LM head, each
linear on a transposed or oneDNN-prepacked weight copy chosen by its number of rows
(rlcpm.rollout.fused_linear). The fused weight
copies are refreshed from the model's parameters before every forward whenever a parameter
changed in place (``update_weights``) or was replaced, so generation always follows the model's
current weights. Results equal the model's forward up to float32 rounding (tested: logits
within 1e-5, greedy tokens identical to transformers).

Applies to float32 and bfloat16 CPU models with a dense-family attention backend (``dense`` and
the engine's mirrored decode backend); other configurations keep the model's own forward. In
bfloat16 the norms and the rotation round as the model's own modules do (logits agree to
bfloat16 rounding) and every GEMM runs on a oneDNN-packed bfloat16 weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rlcpm.kernels.cpu_gemm import OneDNNLinear
from rlcpm.models.dense_attention import DenseAttention
from rlcpm.models.kv_cache import PagedKVCache
from rlcpm.models.metadata import AttentionMetadata
from rlcpm.rollout.fused_linear import FusedLinear
from rlcpm.rollout.packed_linear import PackedLinear


@dataclass
class FusedLayer:
    """The engine-side view of one DecoderLayer: fused projections + references to its norms."""

    qkv: FusedLinear
    o_proj: FusedLinear
    gate_up: FusedLinear
    down_proj: FusedLinear
    input_norm: nn.Module
    post_norm: nn.Module
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    backend_owner: nn.Module  # the layer's Attention module: its .backend may be swapped later
    layer_idx: int


_PLAIN_LINEARS = (nn.Linear, PackedLinear, OneDNNLinear)  # plain x W^T + b, whatever the GEMM


def _projections(model: nn.Module) -> list[nn.Module]:
    layers = model.model.layers
    return [model.lm_head] + [
        module
        for layer in layers
        for module in (
            layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
            layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj,
        )
    ]  # fmt: skip


def can_fuse(model: nn.Module) -> bool:
    """True for a float32 or bfloat16 CPU CausalLM whose layers use a dense-family attention
    backend and whose projections are plain linears (not ternary, QAT or adapter-wrapped layers,
    whose forward is not ``x W^T + b`` over ``.weight``)."""
    return (
        model.device.type == "cpu"
        and model.dtype in (torch.float32, torch.bfloat16)
        and isinstance(getattr(model, "attention_backend", None), DenseAttention)
        and all(type(module) in _PLAIN_LINEARS for module in _projections(model))
    )


def _norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """The model's RMSNorm: w * x / sqrt(mean(x^2) + eps), as one call in float32; in bfloat16
    the module itself (normalised in float32, cast, then scaled: the learner's rounding)."""
    if x.dtype != torch.float32:
        return norm(x)
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)


class FusedDecoder:
    """``decoder(ids [T], positions [T], meta, kv_cache, sample_rows) -> logits [N, V]``."""

    def __init__(self, model: nn.Module, pack: bool = True):
        config = model.config
        self.model = model
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.intermediate_size = config.intermediate_size
        self.residual_scale = config.residual_scale
        self.scale_emb = config.scale_emb
        self.logit_scale_divisor = config.logit_scale_divisor
        self.layers = []
        for index, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                FusedLayer(
                    qkv=FusedLinear([attn.q_proj, attn.k_proj, attn.v_proj], pack),
                    o_proj=FusedLinear([attn.o_proj], pack),
                    gate_up=FusedLinear([mlp.gate_proj, mlp.up_proj], pack),
                    down_proj=FusedLinear([mlp.down_proj], pack),
                    input_norm=layer.input_layernorm,
                    post_norm=layer.post_attention_layernorm,
                    q_norm=attn.q_norm,
                    k_norm=attn.k_norm,
                    backend_owner=attn,
                    layer_idx=index,
                )
            )
        self.lm_head = FusedLinear([model.lm_head], pack)
        self.linears = [
            linear
            for layer in self.layers
            for linear in (layer.qkv, layer.o_proj, layer.gate_up, layer.down_proj)
        ] + [self.lm_head]
        half = self.head_dim // 2
        # rotate_half(x) * sin == flip_halves(x) * (sin * sign): the sign folds the negation in
        self._rope_sign = torch.cat([-torch.ones(half), torch.ones(self.head_dim - half)]).to(model.device)

    def refresh(self) -> int:
        """Rebuild the fused copies of parameters that changed; returns how many were rebuilt."""
        return sum(linear.refresh() for linear in self.linears)

    @torch.inference_mode()
    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: PagedKVCache,
        sample_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [N, V] at ``sample_rows`` (all T rows when None) of one paged-cache step."""
        self.refresh()
        model = self.model
        hidden = model.model.embed_tokens(input_ids)  # [T, H]
        if self.scale_emb != 1.0:
            hidden = hidden * self.scale_emb
        cos, sin = model.model.rotary_emb(positions)  # [T, D] each, float32
        dtype = hidden.dtype  # the rotation runs in the model dtype, as in the model's forward
        rope = (cos[:, None, :].to(dtype), (sin * self._rope_sign)[:, None, :].to(dtype))  # [T, 1, D]
        for layer in self.layers:
            hidden = self._layer(hidden, layer, rope, meta, kv_cache)
        if sample_rows is not None:
            hidden = hidden[sample_rows]
        hidden = _norm(hidden, model.model.norm)
        if self.logit_scale_divisor != 1.0:
            hidden = hidden / self.logit_scale_divisor
        return self.lm_head(hidden)

    def _layer(self, hidden, layer: FusedLayer, rope, meta, kv_cache) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        num_heads, num_kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        qk_width = (num_heads + num_kv_heads) * head_dim
        qkv = layer.qkv(_norm(hidden, layer.input_norm))  # [T, (Hq + 2 Hkv) D]
        qk = qkv[:, :qk_width].view(num_tokens, num_heads + num_kv_heads, head_dim)
        if layer.q_norm is not None:
            qk = torch.cat(
                [_norm(qk[:, :num_heads], layer.q_norm), _norm(qk[:, num_heads:], layer.k_norm)], dim=1
            )
        qk = _rotate(qk, *rope)  # [T, Hq + Hkv, D]
        v = qkv[:, qk_width:].view(num_tokens, num_kv_heads, head_dim)
        backend = layer.backend_owner.backend
        out = backend.forward(qk[:, :num_heads], qk[:, num_heads:], v, meta, layer.layer_idx, kv_cache)
        attn = layer.o_proj(out.reshape(num_tokens, num_heads * head_dim))
        hidden = hidden + (attn if self.residual_scale == 1.0 else attn * self.residual_scale)
        gate_up = layer.gate_up(_norm(hidden, layer.post_norm))  # [T, 2 I]
        gate, up = gate_up[:, : self.intermediate_size], gate_up[:, self.intermediate_size :]
        # silu over the strided half of gate_up runs ~5x slower than over a contiguous copy (CPU)
        act = F.silu(gate.contiguous(), inplace=True).mul_(up)
        mlp = layer.down_proj(act)
        return hidden + (mlp if self.residual_scale == 1.0 else mlp * self.residual_scale)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE of every head at once: x [T, H, D] -> x * cos + rotate_half(x) * sin, with
    rotate_half(x) * sin computed as [x2, x1] * [-sin1, sin2] (the same products)."""
    num_tokens, num_heads, head_dim = x.shape
    swapped = x.view(num_tokens, num_heads, 2, head_dim // 2).flip(2).view(num_tokens, num_heads, head_dim)
    return x * cos + swapped * signed_sin
