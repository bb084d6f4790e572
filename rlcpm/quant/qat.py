"""Quantization-aware training as a transformation of a built model (`prepare`), plus what the
learner needs around it: the weights the rollout engine must receive, and the LR re-warmup.

    prepare_qat(model, learner.qat)     decoder nn.Linear -> BitLinear, in place (same Parameters)
    quantized_named_tensors(model, it)  (name, W) -> (name, W_q) for BitLinear weights: the engine
                                        then samples from exactly the model being trained
    with_rewarmup(schedule, learner.qat)  warmup of at least `rewarmup_steps` when QAT switches on

Which layers: every nn.Linear of the model except the LM head (SPECS §4: embeddings and the LM
head stay in high precision) — in rlcpm's CausalLM, q/k/v/o_proj and gate/up/down_proj of each
decoder layer. The model code knows nothing of this.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from rlcpm.config import QATConfig, ScheduleConfig
from rlcpm.errors import TrainingError
from rlcpm.quant.bitlinear import BitLinear
from rlcpm.quant.ternary import check_group_size, fake_quantize
from rlcpm.quant.ternary_linear import TernaryLinear

LM_HEAD = "lm_head"


def quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of each nn.Linear to quantize: all but the LM head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head and name.rsplit(".", 1)[-1] != LM_HEAD
    ]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at the dotted path `name` inside `model`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def prepare_qat(model: nn.Module, qat: QATConfig) -> nn.Module:
    """Swap every quantizable nn.Linear for a BitLinear sharing its Parameters; returns `model`.

    Raises TrainingError for a model that holds LoRA adapters or packed ternary layers, or
    when `qat.group_size` does not divide (or is not packable with) a layer's input dimension.
    """
    for name, module in model.named_modules():
        if isinstance(module, TernaryLinear):
            raise TrainingError(
                f"{name} is a packed ternary layer: a packed checkpoint cannot be trained; "
                "start QAT from the high-precision checkpoint"
            )
        if ".lora_" in name or type(module).__module__.startswith("peft."):
            raise TrainingError(
                "learner.qat cannot be combined with LoRA adapters (the merged weight would not be ternary); "
                "unset learner.lora or learner.qat"
            )
    targets = [(name, m) for name, m in quantizable_linears(model) if not isinstance(m, BitLinear)]
    for name, linear in targets:
        check_group_size(
            linear.in_features,
            qat.group_size,
            where=f"learner.qat.group_size for layer {name}",
            error=TrainingError,
        )
        if linear.in_features % 4:
            raise TrainingError(
                f"layer {name}: input dimension {linear.in_features} is not a multiple of 4, "
                "so its ternary codes cannot be packed 4 per byte"
            )
    for name, linear in targets:
        replace_module(model, name, BitLinear.from_linear(linear, qat.group_size))
    return model


def qat_group_sizes(model: nn.Module) -> dict[str, int]:
    """Parameter name of each BitLinear weight -> its group size ({} for a model without QAT)."""
    return {f"{name}.weight": m.group_size for name, m in model.named_modules() if isinstance(m, BitLinear)}


def is_qat_model(model: nn.Module) -> bool:
    return any(isinstance(m, BitLinear) for m in model.modules())


def quantized_named_tensors(
    model: nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The same stream with each BitLinear latent weight W replaced by its forward weight W_q.

    `named_tensors` uses the model's parameter names (e.g. Learner.named_weights()).
    """
    group_sizes = qat_group_sizes(model)
    for name, tensor in named_tensors:
        group_size = group_sizes.get(name)
        yield name, (fake_quantize(tensor.detach(), group_size) if group_size else tensor)


def with_rewarmup(schedule: ScheduleConfig, qat: QATConfig | None) -> ScheduleConfig:
    """The schedule QAT trains with: its warmup lasts at least `qat.rewarmup_steps` steps.

    QAT starts from a trained checkpoint whose optimizer state is gone and whose forward just
    changed (W -> W_q); BitCPM re-warms the learning rate from 0 (the report calls it critical).
    """
    if qat is None or not qat.enabled or qat.rewarmup_steps <= schedule.warmup_steps:
        return schedule
    return schedule.model_copy(update={"warmup_steps": qat.rewarmup_steps})
