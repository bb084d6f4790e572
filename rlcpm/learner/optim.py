"""AdamW over the trainable parameters (no weight decay on norms and biases) and gradient clipping."""

from __future__ import annotations

import torch
from torch import nn

from rlcpm.config import OptimizerConfig


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, lr: float) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay, Loshchilov & Hutter) on parameters that require grad.

    Matrices decay with `weight_decay`; vectors (norm weights, biases) do not.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)


def clip_gradients(model: nn.Module, max_norm: float | None) -> float:
    """Clip the global gradient norm to `max_norm` (None: only measure it); returns the norm before clipping.

    Works on FSDP2 shards (DTensor gradients: the norm is global across ranks).
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    full_tensor = getattr(norm, "full_tensor", None)
    return float(full_tensor() if full_tensor is not None else norm)
