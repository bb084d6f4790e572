"""Hugging Face checkpoint directories in and out: config.json + safetensors (single or sharded).

Loading streams tensor by tensor: the model is built on the meta device, allocated once
(`to_empty`) in the target dtype/device, and each checkpoint tensor is read, checked and
copied into its parameter before the next is read, so peak memory is the model plus one
tensor. Saving writes only real tensors (no duplicate `lm_head.weight` when embeddings are
tied, as HF does), sharded with `model.safetensors.index.json` above `max_shard_bytes`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rlcpm.errors import CheckpointError
from rlcpm.kernels.infllm_v2.config import InfLLMv2Config
from rlcpm.models.config import ModelConfig
from rlcpm.models.transformer import CausalLM

log = logging.getLogger("rlcpm.models")

# config.json key of a QAT checkpoint's model/ directory: its weights are the latent ones
QAT_LATENT_KEY = "rlcpm_qat_latent_weights"

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None, default: torch.dtype) -> torch.dtype:
    """None / "auto" -> `default`; "bfloat16" -> torch.bfloat16; torch dtypes pass through."""
    if dtype is None or dtype == "auto":
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPE_NAMES:
        raise CheckpointError(f"dtype {dtype!r} is not one of auto, {', '.join(_DTYPE_NAMES)}")
    return _DTYPE_NAMES[dtype]


def check_device(device: torch.device | str) -> torch.device:
    """`device` as a torch device present on this machine (torch itself fails later, with an
    AssertionError or deep inside `to_empty`)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise CheckpointError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from err
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        raise CheckpointError(
            f"device {str(device)!r}: {count} CUDA device(s) visible here; use device='cpu'"
        )
    return device


_LOCAL_ONLY = (
    " (rlcpm loads local directories only: a checkpoint you downloaded, or the quickstart's"
    " starting model, which `rlcpm quickstart` builds)"
)


def read_config(path: str | Path) -> ModelConfig:
    """Parse `path/config.json` into a ModelConfig (errors name the file)."""
    config_path = Path(path) / CONFIG_NAME
    if not Path(path).is_dir():
        raise CheckpointError(f"model directory not found: {path}{_LOCAL_ONLY}")
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: missing; a model directory needs config.json + *.safetensors")
    try:
        hf = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path}: not valid JSON: {err}") from err
    if not isinstance(hf, dict):
        raise CheckpointError(f"{config_path}: top level must be a JSON object")
    return ModelConfig.from_hf(hf, source=str(config_path))


# The files of a Hugging Face tokenizer (fast and slow formats), copied with a model it belongs to.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def load_tokenizer(path: str | Path):
    """The tokenizer of a Hugging Face directory (`transformers.AutoTokenizer`).

    AutoTokenizer parses config.json to pick the tokenizer class, and fails on a model type
    transformers cannot parse without remote code (MiniCPM4's `minicpm` with longrope), even
    when tokenizer_config.json names the class. Then the tokenizer is loaded without the
    model's config; if that fails too, the error names the directory and the first cause.
    """
    from transformers import AutoTokenizer, PreTrainedConfig

    path = Path(path).expanduser()  # `~` as in model.path
    if not path.is_dir():  # else transformers reads the path as a hub repo id
        raise CheckpointError(f"tokenizer directory not found: {path}{_LOCAL_ONLY}")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as first:  # retried below without the model config
        try:
            return AutoTokenizer.from_pretrained(str(path), config=PreTrainedConfig())
        except Exception:
            raise CheckpointError(
                f"cannot load a tokenizer from {path}: {type(first).__name__}: {first} "
                "(a directory needs tokenizer.json or the files of a Hugging Face tokenizer; "
                "point `model.tokenizer` at another directory if it lives elsewhere)"
            ) from first


def checkpoint_files(path: str | Path) -> dict[Path, list[str] | None]:
    """Safetensors files of a directory -> the tensor names the index assigns them (None: all)."""
    path = Path(path)
    index_path = path / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            files: dict[Path, list[str] | None] = {}
            for name, file_name in weight_map.items():  # tensor name -> shard file name
                files.setdefault(path / file_name, []).append(name)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({err})") from err
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{file}: listed in {index_path.name} but missing")
        return files
    if (path / SINGLE_FILE).is_file():
        return {path / SINGLE_FILE: None}
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{path}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file")
    return dict.fromkeys(found)


def load_model(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    attention: str = "dense",
    sparse_config: dict | None = None,
) -> CausalLM:
    """Load a HF directory (llama, qwen2, qwen3, minicpm) into a CausalLM in eval mode.

    dtype: None/"auto" keeps the checkpoint's `torch_dtype`. attention: backend name.
    sparse_config: InfLLM v2 settings overriding the checkpoint's `sparse_config` key by key
    (recipe's `model.sparse_attention`; unknown keys raise); used by attention="sparse".
    A config.json with a `quantization_config` (a packed BitCPM ternary export) is loaded by
    rlcpm.quant.loading: its decoder linears become TernaryLinear layers.
    Raises CheckpointError naming the file and tensor for missing / unexpected / misshapen
    tensors and unreadable files; UnsupportedModelError for an unknown model_type.
    """
    device = check_device(device)
    config = read_config(path)
    if QAT_LATENT_KEY in config.extra:
        log.warning(
            "%s holds the latent weights of a QAT checkpoint: loaded in full precision, not as the "
            "ternary model that was trained (resume with Learner.load_checkpoint; serve the run's "
            "final/ export)",
            path,
        )
    if sparse_config is not None:
        config.sparse_config = InfLLMv2Config.merged(config.sparse_config, sparse_config)
    if config.extra.get("quantization_config") is not None:  # packed weights: rlcpm.quant knows the format
        from rlcpm.quant.loading import load_quantized_model

        return load_quantized_model(path, dtype, device, attention, sparse_config=sparse_config)
    config.attention = attention
    dtype = resolve_dtype(dtype, config.torch_dtype)
    config.torch_dtype = dtype
    files = checkpoint_files(path)
    with torch.device("meta"):
        model = CausalLM(config)
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()  # to_empty re-creates parameters, which unties them
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    stored_heads: list[torch.Tensor] = []  # an lm_head.weight a tied checkpoint stores anyway
    for file, names in files.items():
        _load_file(file, names, params, loaded, config, stored_heads)
    missing = sorted(set(params) - loaded)
    if missing:
        where = ", ".join(str(f.name) for f in files)
        raise CheckpointError(
            f"{Path(path)}: tensor(s) missing from {where}: {', '.join(missing[:8])}"
            + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        )
    if stored_heads and not torch.equal(stored_heads[0].to(dtype), params["model.embed_tokens.weight"]):
        log.warning(
            "%s: config.json ties the LM head to the embeddings (tie_word_embeddings), but the "
            "checkpoint stores a different lm_head.weight; it is ignored, as vLLM does (set "
            "tie_word_embeddings: false in config.json to use it)",
            path,
        )
    return model.eval()


@torch.no_grad()
def _load_file(
    file: Path,
    names: list[str] | None,
    params: dict,
    loaded: set[str],
    config: ModelConfig,
    stored_heads: list[torch.Tensor],
) -> None:
    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{file}: cannot read safetensors file ({err})") from err
    with handle:
        keys = list(handle.keys())
        for name in names if names is not None else keys:
            if name not in keys:
                raise CheckpointError(f"{file}: tensor {name!r} is listed in the index but not in the file")
            if name.endswith("rotary_emb.inv_freq"):
                continue  # recomputed
            if config.tie_word_embeddings and name == "lm_head.weight":
                stored_heads.append(handle.get_tensor(name))  # shared with embed_tokens: only compared
                continue
            if name not in params:
                raise CheckpointError(
                    f"{file}: unexpected tensor {name!r}: not a parameter of a {config.model_type} model "
                    f"with {config.num_hidden_layers} layers (check config.json)"
                )
            param = params[name]
            shape = tuple(handle.get_slice(name).get_shape())
            if shape != tuple(param.shape):
                raise CheckpointError(
                    f"{file}: tensor {name!r} has shape {shape}, the model (config.json) expects {tuple(param.shape)}"
                )
            try:
                tensor = handle.get_tensor(name)
            except Exception as err:
                raise CheckpointError(f"{file}: cannot read tensor {name!r} ({err})") from err
            param.copy_(tensor)
            loaded.add(name)


def _tensors_to_save(model: CausalLM) -> dict[str, torch.Tensor]:
    """Parameter name -> tensor, without the tied lm_head duplicate."""
    tensors = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        tensors[name] = param.detach()
    return tensors


def save_model(model: CausalLM, path: str | Path, max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write config.json, generation_config.json and safetensors weights to `path`.

    One `model.safetensors` when the weights fit in `max_shard_bytes`, else
    `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`.
    Stale weight files of an earlier save in the same directory are removed.
    """
    if not isinstance(model, CausalLM):
        raise CheckpointError(
            f"save_model expects an rlcpm CausalLM, got {type(model).__name__} "
            "(merge a peft model first: model.merge_and_unload())"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = _tensors_to_save(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += size
    for stale in [*path.glob("model*.safetensors"), path / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        _save_shard(shards[0], path / SINGLE_FILE)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _save_shard(shard, path / file_name)
            weight_map.update(dict.fromkeys(shard, file_name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2))
    config = model.config.to_hf()
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    generation = {
        key: getattr(model.config, key)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id")
        if getattr(model.config, key) is not None
    }
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return path


def _save_shard(tensors: dict[str, torch.Tensor], file: Path) -> None:
    cpu = {name: t.to("cpu").contiguous() for name, t in tensors.items()}
    save_file(cpu, str(file), metadata={"format": "pt"})
