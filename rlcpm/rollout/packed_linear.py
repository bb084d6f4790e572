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

import functools
import time

import torch
import torch.nn.functional as F
from torch import nn

from rlcpm.kernels.cpu_gemm import onednn_available


def is_packing_available() -> bool:
    """oneDNN's linear (rlcpm.kernels.cpu_gemm) plus its weight prepacking."""
    return onednn_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


# Row counts at which `packed_gemm_min_rows` compares the two GEMMs, and its answer when the
# packed call never wins among them (larger prefill batches still use the packed copy).
CALIBRATION_ROWS = (1, 2, 4, 8, 16, 32, 64)
_REPEATS = 7


@functools.cache
def packed_gemm_min_rows(in_features: int, out_features: int, num_threads: int) -> int:
    """Fewest rows from which this machine's packed oneDNN float32 GEMM beats the plain one
    (``x @ W^T`` on a contiguous transposed copy) for a [out, in] weight at every larger row
    count measured; `CALIBRATION_ROWS[-1]` when it never does.

    Measured once per weight shape and thread count per process (best of a few calls per row
    count, tens of milliseconds in all). The crossover is the CPU's, not the code's: on the
    Xeon the thresholds were first tuned on, the packed call lost 10-50% at 1-16 rows; on the
    EPYC of a later VM it won 1.3-4x from 4 rows. Both paths compute the same dot products, so
    the choice changes results only by float rounding.
    """
    weight = torch.randn(out_features, in_features)
    transposed = weight.t().contiguous()
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_size=32)
    packed_wins = []
    with torch.inference_mode():
        for rows in CALIBRATION_ROWS:
            x = torch.randn(rows, in_features)
            plain_s = _best_time(torch.mm, x, transposed)
            packed_s = _best_time(torch.ops.mkldnn._linear_pointwise, x, packed, None, "none", [], "")
            packed_wins.append(packed_s < plain_s)
    threshold = CALIBRATION_ROWS[-1]
    for rows, wins in zip(reversed(CALIBRATION_ROWS), reversed(packed_wins)):
        if not wins:
            break
        threshold = rows
    return threshold


def _best_time(fn, *args) -> float:
    fn(*args)  # warm-up
    best = float("inf")
    for _ in range(_REPEATS):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return best


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
