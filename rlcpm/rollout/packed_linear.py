"""CPU inference linears on oneDNN-prepacked weights: a transformation of a built model.

On CPU, ``F.linear`` goes through a generic GEMM that re-packs the weight on every call; for
the skinny matrices of decoding (a few dozen rows against a large weight) that dominates.
oneDNN can pack a weight once into its blocked layout (``mkldnn._reorder_linear_weight``)
and multiply against it directly — measured 1.3-3x faster on the engine's shapes, most on
the LM head. ``pack_linear_layers(model)`` turns every float32 ``nn.Linear`` of a CPU model
into a ``PackedLinear`` in place (same class hierarchy, same parameters and names, so the
learner-facing view of the model and ``update_weights`` are unchanged) and keeps one packed
copy of each weight next to it. The weight's version counter is checked on every call, so any
in-place change (``update_weights``, an optimizer step on a shared model) repacks before the
next use; a stale copy is never read. With grad enabled, or off CPU / float32, the layer is a
plain ``nn.Linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def is_packing_available() -> bool:
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose no-grad CPU float32 forward uses a prepacked weight."""

    packed_weight: torch.Tensor | None = None
    packed_version: int = -1

    def repack(self, batch_size_hint: int = 32) -> None:
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(
            self.weight.detach(), batch_size=batch_size_hint
        )
        self.packed_version = self.weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != torch.float32 or self.weight.dtype != torch.float32:
            return F.linear(x, self.weight, self.bias)
        if self.packed_version != self.weight._version:
            self.repack()
        flat = x.reshape(-1, x.shape[-1])
        bias = None if self.bias is None else self.bias.detach()
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed_weight, bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])


def pack_linear_layers(model: nn.Module, min_weight_numel: int = 1 << 18) -> list[PackedLinear]:
    """Switch the float32 CPU ``nn.Linear`` layers of ``model`` with at least ``min_weight_numel``
    weights to ``PackedLinear`` (in place). Smaller layers stay plain: for them the packed
    call's fixed cost (~20 us) outweighs the GEMM time it saves."""
    if not is_packing_available():
        return []
    packed = []
    for module in model.modules():
        if (
            type(module) is nn.Linear
            and module.weight.device.type == "cpu"
            and module.weight.dtype == torch.float32
            and module.weight.numel() >= min_weight_numel
        ):
            module.__class__ = PackedLinear
            module.repack()
            packed.append(module)
    return packed
