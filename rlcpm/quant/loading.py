"""Load a packed ternary checkpoint (rlcpm.quant.export) into a CausalLM with TernaryLinear layers.

`rlcpm.models.load_model` hands any directory whose config.json has a `quantization_config` to
`load_quantized_model`, so `load_model(path)` and `Engine.from_pretrained(path)` run packed
models without knowing about quantization. Loading streams tensor by tensor like load_model:
the model is built on the meta device, its linear layers swapped for TernaryLinear, allocated
once, and each checkpoint tensor is checked (name, shape, dtype) and copied in.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from rlcpm.errors import CheckpointError, UnsupportedModelError
from rlcpm.kernels.infllm_v2.config import InfLLMv2Config
from rlcpm.kernels.ternary import unpack_ternary
from rlcpm.models.checkpoint import checkpoint_files, read_config, resolve_dtype
from rlcpm.models.transformer import CausalLM
from rlcpm.quant.export import QUANT_METHOD
from rlcpm.quant.qat import quantizable_linears, replace_module
from rlcpm.quant.ternary_linear import TernaryLinear


def ternary_group_size(quant: object, source: str) -> int:
    """The group size of a `quantization_config` entry; errors name the file and the key."""
    if not isinstance(quant, dict):
        raise CheckpointError(f"{source}: quantization_config must be an object, got {quant!r}")
    method = quant.get("quant_method")
    if method != QUANT_METHOD:
        raise UnsupportedModelError(
            f"{source}: quantization_config.quant_method {method!r} is not supported; rlcpm loads {QUANT_METHOD!r}"
        )
    group_size = quant.get("group_size")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise CheckpointError(
            f"{source}: quantization_config.group_size must be a positive int, got {group_size!r}"
        )
    return group_size


def load_quantized_model(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    attention: str = "dense",
    sparse_config: dict | None = None,
) -> CausalLM:
    """A packed ternary HF directory -> CausalLM (eval mode) whose decoder linears are TernaryLinear.

    dtype: of activations, scales and unquantized weights (None/"auto": the checkpoint's).
    attention / sparse_config: as rlcpm.models.load_model.
    """
    config = read_config(path)
    if sparse_config is not None:
        config.sparse_config = InfLLMv2Config.merged(config.sparse_config, sparse_config)
    source = str(Path(path) / "config.json")
    group_size = ternary_group_size(config.extra.get("quantization_config"), source)
    config.attention = attention
    dtype = resolve_dtype(dtype, config.torch_dtype)
    config.torch_dtype = dtype
    with torch.device("meta"):
        model = CausalLM(config)
        for name, linear in quantizable_linears(model):
            try:
                packed = TernaryLinear(
                    linear.in_features, linear.out_features, linear.bias is not None, group_size, dtype=dtype
                )
            except CheckpointError as err:
                raise CheckpointError(f"{source}: layer {name}: {err}") from err
            replace_module(model, name, packed)
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    loaded: set[str] = set()
    for file, names in checkpoint_files(path).items():
        _load_file(file, names, targets, loaded, config.tie_word_embeddings)
    missing = sorted(set(targets) - loaded)
    if missing:
        raise CheckpointError(f"{Path(path)}: tensor(s) missing: {', '.join(missing[:8])}")
    return model.eval()


@torch.no_grad()
def _load_file(file: Path, names: list[str] | None, targets: dict, loaded: set[str], is_tied: bool) -> None:
    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{file}: cannot read safetensors file ({err})") from err
    with handle:
        for name in names if names is not None else list(handle.keys()):
            if is_tied and name == "lm_head.weight":
                continue
            target = targets.get(name)
            if target is None:
                raise CheckpointError(f"{file}: unexpected tensor {name!r} for this config.json")
            tensor = handle.get_tensor(name)
            if tuple(tensor.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
                )
            if (tensor.dtype == torch.uint8) != (target.dtype == torch.uint8):
                raise CheckpointError(
                    f"{file}: tensor {name!r} is {tensor.dtype}, expected {target.dtype} "
                    "(packed ternary weights are uint8; is quantization_config right?)"
                )
            if target.dtype == torch.uint8:
                unpack_ternary(tensor, validate=True)
            target.copy_(tensor)
            loaded.add(name)
