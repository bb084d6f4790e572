"""ModelConfig: the architecture of one decoder, read from / written to a HF config.json.

One dataclass covers Llama, Qwen2, Qwen3 and MiniCPM(4); the differences are flags:

| model_type | qkv bias | q/k norm | muP scalings (scale_emb, scale_depth, dim_model_base) |
|------------|----------|----------|-------------------------------------------------------|
| llama      | attention_bias | no | no                                                    |
| qwen2      | yes      | no       | no                                                    |
| qwen3      | attention_bias | yes | no                                                   |
| minicpm    | attention_bias | no | yes (SPECS §6)                                        |

RoPE parameters are read from either transformers-4 keys (`rope_theta`, `rope_scaling`) or
transformers-5 keys (`rope_parameters`) and normalised to `rope_theta` + `rope_scaling`
(None for plain RoPE, else a dict with `rope_type`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from rlcpm.errors import CheckpointError, UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "minicpm")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "minicpm": "MiniCPMForCausalLM",
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """Architecture hyper-parameters (HF names). `head_dim` defaults to hidden / heads."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v/o bias (llama, qwen3, minicpm)
    mlp_bias: bool = False
    # MiniCPM muP scalings; neutral values for the other architectures.
    scale_emb: float = 1.0
    # residual branch * scale_depth / sqrt(L); None: 1 (minicpm: scale_depth 1, as MiniCPMConfig)
    scale_depth: float | None = None
    # final hidden / (hidden_size / dim_model_base); None: 1 (minicpm: dim_model_base 1, as MiniCPMConfig)
    dim_model_base: int | None = None
    sparse_config: dict | None = None  # MiniCPM4 InfLLM v2 settings, kept for the sparse backend
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: torch.dtype = torch.float32
    initializer_range: float = 0.02
    attention: str = "dense"  # attention backend name (rlcpm.models.attention registry)
    extra: dict = field(default_factory=dict)  # other config.json keys, written back unchanged

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.model_type == "minicpm":
            # modeling_minicpm.py always applies both scalings; MiniCPMConfig defaults them to 1
            self.scale_depth = 1.0 if self.scale_depth is None else self.scale_depth
            self.dim_model_base = 1 if self.dim_model_base is None else self.dim_model_base
        for name in ("num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise CheckpointError(f"{name} ({getattr(self, name)}) must be positive")
        if self.head_dim % 2:
            raise CheckpointError(
                f"head_dim ({self.head_dim}) must be even: RoPE rotates pairs of dimensions"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act not in ("silu", "swish"):
            raise UnsupportedModelError(f"hidden_act {self.hidden_act!r} is not supported (only silu)")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise UnsupportedModelError(
                    f"rope_scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
                )
            if rope_type == "longrope" and self.model_type != "minicpm":
                raise UnsupportedModelError(
                    f"rope_scaling type 'longrope' with model_type {self.model_type!r} is not supported: "
                    "rlcpm's longrope is MiniCPM4's (model_type minicpm); transformers' longrope picks its "
                    "factor table per forward from the sequence length and would give other logits"
                )
            self.rope_scaling = {**self.rope_scaling, "rope_type": rope_type}
            self.rope_scaling.pop("type", None)
            if rope_type == "default":
                self.rope_scaling = None

    # ------------------------------------------------------------------------ derived flags

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type != "qwen2" and self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    @property
    def residual_scale(self) -> float:
        """Multiplier of every residual branch: scale_depth / sqrt(num_hidden_layers) (MiniCPM)."""
        if self.scale_depth is None:
            return 1.0
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def logit_scale_divisor(self) -> float:
        """The final hidden state is divided by this before the LM head: hidden / dim_model_base."""
        if self.dim_model_base is None:
            return 1.0
        return self.hidden_size / self.dim_model_base

    # ------------------------------------------------------------------------- HF mapping

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Parse a HF config.json dict. Raises UnsupportedModelError / CheckpointError naming `source`."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"{source}: model_type {model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError(f"{source}: use_sliding_window=true is not supported")
        missing = [
            k
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
            )
            if k not in hf
        ]
        if missing:
            raise CheckpointError(f"{source}: required keys missing: {', '.join(missing)}")
        for key in ("rope_scaling", "rope_parameters"):
            if hf.get(key) is not None and not isinstance(hf[key], dict):
                raise CheckpointError(f"{source}: {key} must be an object or null, got {hf[key]!r}")
        rope_params = dict(hf.get("rope_parameters") or {})
        nested_theta = rope_params.pop("rope_theta", None)
        rope_theta = next((t for t in (hf.get("rope_theta"), nested_theta) if t is not None), 10000.0)  # null: default
        rope_scaling = hf.get("rope_scaling") or (rope_params or None)
        if isinstance(rope_scaling, dict):
            rope_scaling = {k: v for k, v in rope_scaling.items() if k != "rope_theta"}
        known = {f.name for f in fields(cls)} - {"extra", "torch_dtype", "rope_theta", "rope_scaling"}
        known.discard("attention")
        kwargs = {k: hf[k] for k in known if hf.get(k) is not None}
        _check_types(kwargs, source)
        if model_type == "minicpm":
            kwargs.setdefault("tie_word_embeddings", True)  # MiniCPMConfig's default (MiniCPM-1B/2B omit it)
        dtype_name = hf.get("torch_dtype") or hf.get("dtype") or "float32"
        if dtype_name not in _DTYPES:
            raise CheckpointError(f"{source}: dtype {dtype_name!r} not one of {', '.join(_DTYPES)}")
        handled = known | {"torch_dtype", "dtype", "rope_theta", "rope_scaling", "rope_parameters"}
        extra = {
            k: v
            for k, v in hf.items()
            if k not in handled and k not in ("architectures", "transformers_version")
        }
        try:
            return cls(
                **kwargs,
                rope_theta=float(rope_theta),
                rope_scaling=rope_scaling,
                torch_dtype=_DTYPES[dtype_name],
                extra=extra,
            )
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{source}: invalid config: {err}") from err

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers (llama/qwen2/qwen3) and rlcpm both read."""
        out: dict[str, Any] = dict(self.extra)
        out.update(
            {
                "architectures": [_ARCHITECTURES[self.model_type]],
                "model_type": self.model_type,
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.head_dim,
                "hidden_act": self.hidden_act,
                "rms_norm_eps": self.rms_norm_eps,
                "max_position_embeddings": self.max_position_embeddings,
                "rope_theta": self.rope_theta,
                "rope_scaling": self.rope_scaling,
                "tie_word_embeddings": self.tie_word_embeddings,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id,
                "torch_dtype": str(self.torch_dtype).removeprefix("torch."),
                "initializer_range": self.initializer_range,
            }
        )
        if self.model_type != "qwen2":
            out["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            out["mlp_bias"] = self.mlp_bias
        if self.model_type == "minicpm":
            out.update(
                scale_emb=self.scale_emb, scale_depth=self.scale_depth, dim_model_base=self.dim_model_base
            )
        if self.sparse_config is not None:  # any model type may run InfLLM v2 (attention: sparse)
            out["sparse_config"] = self.sparse_config
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (peft and loggers call this on `model.config`)."""
        data = asdict(self)
        data["torch_dtype"] = str(self.torch_dtype).removeprefix("torch.")
        return data

    def get(self, key: str, default: Any = None) -> Any:
        """dict-style access, as peft expects of `model.config`."""
        return getattr(self, key, default)


def _check_types(values: dict[str, Any], source: str) -> None:
    """CheckpointError for a bool or int config key of another JSON type ("false" would be true)."""
    types = {f.name: f.type for f in fields(ModelConfig)}
    for key, value in values.items():
        if types[key] == "bool" and not isinstance(value, bool):
            raise CheckpointError(f"{source}: {key} must be true or false, got {value!r}")
        if types[key] == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise CheckpointError(f"{source}: {key} must be an integer, got {value!r}")
