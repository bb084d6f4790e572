"""Packed ternary export: a QAT model -> a Hugging Face directory of 2-bit codes + group scales.

Each BitLinear weight W [out, in] becomes two tensors (names as transformers' BitNet uses them):

    <layer>.weight        uint8 [out, in / 4]   codes of W_q, four per byte (rlcpm.kernels.ternary.packing)
    <layer>.weight_scale  dtype [out, in / g]   s = max(mean |W_g|, eps) per group of g inputs

Every other tensor (embeddings, norms, LM head, biases) is written in `dtype`. config.json gets

    "quantization_config": {"quant_method": "bitcpm_ternary", "group_size": g, "bits": 2, ...}

which `rlcpm.models.load_model` recognises (rlcpm.quant.loading). codes * scales reproduces
W_q exactly in `dtype` (codes are -1, 0, 1). Size of a quantized layer: 2 bits per weight plus
one scale per group, i.e. 16 / (2 + 16 / g) = 6.4x smaller than bfloat16 at g = 32 with bf16
scales (8x for the codes alone).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from rlcpm.errors import CheckpointError
from rlcpm.kernels.ternary import pack_ternary
from rlcpm.models.checkpoint import QAT_LATENT_KEY, TOKENIZER_FILES
from rlcpm.quant.bitlinear import BitLinear
from rlcpm.quant.qat import qat_group_sizes, replace_module
from rlcpm.quant.ternary import quantize
from rlcpm.quant.ternary_linear import TernaryLinear

QUANT_METHOD = "bitcpm_ternary"
PACK_FORMAT = "2bit-quarters-v1"  # rlcpm.kernels.ternary.packing
SCALE_SUFFIX = "_scale"


def quantization_config(group_size: int) -> dict:
    """The config.json entry of a packed ternary checkpoint."""
    return {
        "quant_method": QUANT_METHOD,
        "group_size": group_size,
        "bits": 2,
        "pack_format": PACK_FORMAT,
        "modules_to_not_convert": ["model.embed_tokens", "lm_head"],
    }


def ternary_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]], group_sizes: dict[str, int], dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """(name, latent tensor) -> the checkpoint's tensors: packed codes + scales for `group_sizes` names."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in named_tensors:
        tensor = tensor.detach().to("cpu")
        target = dtype or tensor.dtype
        group_size = group_sizes.get(name)
        if group_size is None:
            out[name] = tensor.to(target).contiguous()
            continue
        codes, scales = quantize(tensor, group_size)
        out[name] = pack_ternary(codes)
        out[name + SCALE_SUFFIX] = scales.to(target).contiguous()
    missing = sorted(set(group_sizes) - set(out))
    if missing:
        raise CheckpointError(
            f"cannot export a ternary model: no tensor for quantized weight(s) {missing[:5]}"
        )
    return out


def save_ternary_model(
    model: nn.Module,
    path: str | Path,
    *,
    named_tensors: Iterable[tuple[str, torch.Tensor]] | None = None,
    dtype: torch.dtype | None = None,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Write a QAT-prepared CausalLM (BitLinear layers) as a packed ternary HF directory.

    named_tensors: the latent weights by parameter name (default: the model's own; under FSDP2
    pass Learner.latent_weights(), not named_weights(), which are already quantized). dtype: of scales and unquantized tensors (default:
    each tensor's own). tokenizer_dir: copy its tokenizer files alongside.
    """
    group_sizes = qat_group_sizes(model)
    if not group_sizes:
        raise CheckpointError(
            "save_ternary_model needs a QAT model (rlcpm.quant.prepare_qat): it has no BitLinear"
        )
    if len(set(group_sizes.values())) != 1:
        raise CheckpointError(
            f"BitLinear layers use different group sizes {sorted(set(group_sizes.values()))}"
        )
    if named_tensors is None:
        named_tensors = ((name, p.detach()) for name, p in model.named_parameters())
    tensors = ternary_tensors(named_tensors, group_sizes, dtype)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_safetensors(tensors, path, max_shard_bytes)
    config = model.config.to_hf()
    config.pop(QAT_LATENT_KEY, None)  # a model started from a QAT checkpoint: this export is not latent
    float_dtypes = {t.dtype for name, t in tensors.items() if t.is_floating_point()}
    config["torch_dtype"] = str(dtype or max(float_dtypes, key=lambda d: torch.finfo(d).bits)).removeprefix(
        "torch."
    )
    config["quantization_config"] = quantization_config(next(iter(group_sizes.values())))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    generation = {
        key: getattr(model.config, key)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id")
        if getattr(model.config, key, None) is not None
    }
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copyfile(Path(tokenizer_dir) / name, path / name)
    return path


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path, max_shard_bytes: int) -> None:
    """model.safetensors, or model-0000i-of-0000n shards + index above `max_shard_bytes`."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and used + size > max_shard_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = tensor
        used += size
    for stale in [*path.glob("model*.safetensors"), path / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


@torch.no_grad()
def convert_to_ternary(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """In place: every BitLinear -> a TernaryLinear holding its packed W_q (scales in `dtype`)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BitLinear):
            replace_module(
                model, name, TernaryLinear.from_weight(module.weight, module.bias, module.group_size, dtype)
            )
    return model
