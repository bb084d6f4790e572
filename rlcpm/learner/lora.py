"""LoRA through peft on rlcpm's CausalLM, and the merged-weight view the engine needs.

    W' = W + (alpha / r) * B A          (Hu et al., arXiv 2106.09685)

Adapters are injected in place (`peft.inject_adapter_in_model`), so parameter names become
`...q_proj.base_layer.weight`, `...q_proj.lora_A.default.weight`, ... Only adapter weights train.
`merged_named_tensors` yields the Hugging Face names with W' computed on the fly (the training
model is never merged or otherwise mutated); `adapters_disabled` turns the adapters off for a
forward of the base model, which is the reference policy with LoRA (no second copy in memory).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import peft
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from rlcpm.config import LoraConfig
from rlcpm.errors import TrainingError

ADAPTER = "default"


def apply_lora(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """Inject LoRA adapters into the `lora.targets` linear layers; freeze everything else."""
    present = {
        name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)
    } - {"lm_head"}  # the log-prob head cannot carry an adapter (LoraConfig refuses it)
    missing = sorted(set(lora.targets) - present)
    if missing:
        raise TrainingError(
            f"learner.lora.targets: no linear layer named {missing} in the model (it has {sorted(present)})"
        )
    config = peft.LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.targets)
    )
    model = peft.inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(module, LoraLayer) for module in model.modules())


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model: every LoRA layer skips its adapter inside the block."""
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 shard) gathered to the full tensor; a plain tensor as is (a collective!)."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if full_tensor is not None else tensor


def merged_named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full detached tensor) for every weight, LoRA merged: W + scaling * B A.

    Gathers FSDP2 shards, so every rank must iterate in step. Tied weights appear once.
    """
    lora_layers = {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    for name, param in model.named_parameters():
        if ".lora_" in name:
            continue
        if ".base_layer." not in name:
            yield name, _full(param.detach())
            continue
        owner, leaf = name.split(".base_layer.", 1)
        tensor = _full(param.detach())
        layer = lora_layers[owner]
        if leaf == "weight" and ADAPTER in layer.lora_A:
            lora_a = _full(layer.lora_A[ADAPTER].weight.detach()).float()
            lora_b = _full(layer.lora_B[ADAPTER].weight.detach()).float()
            delta = (lora_b @ lora_a) * layer.scaling[ADAPTER]
            tensor = (tensor.float() + delta).to(tensor.dtype)
        yield f"{owner}.{leaf}", tensor


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable LoRA tensors by their (peft) parameter names, gathered full."""
    return {name: _full(p.detach()).clone() for name, p in model.named_parameters() if ".lora_" in name}
