"""One linear map over the weights of several ``nn.Linear`` layers: an engine-side copy.

``FusedLinear([q_proj, k_proj, v_proj])(x)`` computes ``cat([q_proj(x), k_proj(x), v_proj(x)], -1)``
with ONE matrix multiply over a weight built by concatenating the layers' weights along the
output dimension, ``W = [Wq; Wk; Wv]`` ([sum N_i, K]), and their biases (zeros where a layer has
none). The weight is kept transposed, ``W^T`` [K, N] contiguous, for ``addmm(b, x, W^T)``
(faster than ``F.linear``'s transposed-operand GEMM on decode shapes: up to 2x at 8 rows).
On CPU in float32 a large enough ``W`` is also prepacked for oneDNN
(``torch.ops.mkldnn._linear_pointwise``, see rlcpm.rollout.packed_linear) and each call picks
a GEMM by its number of rows: a weight larger than the caches (an LM head) uses the packed
copy from 2 rows; a smaller one from the row count where the packed call starts to win on
this machine (``packed_gemm_min_rows``, measured once per shape: it differs by CPU, from 4 rows
on an EPYC to 32 on a Xeon). A bfloat16 ``W`` is
always packed and always used packed: oneDNN's bfloat16 GEMM (AVX512-BF16 / AMX) beat the
plain bfloat16 GEMM 1.2-3.4x at 1-32 rows on the development VM's EPYC, and the float32 one
2.5-4.4x from 8 rows. Each output column is
the same dot product the separate layer computes (the sum order inside a GEMM may differ, so
results agree to rounding).

The copy follows the source layers: ``refresh()`` rebuilds it when any source weight or bias
changed in place (its version counter moved: ``update_weights``, an optimizer step) or was
replaced, so a stale copy is never used as long as ``refresh()`` runs before each forward
(the fused decoder does it once per step). The source modules are never modified.
"""

from __future__ import annotations

import torch
from torch import nn

from rlcpm.rollout.packed_linear import is_packing_available, packed_gemm_min_rows

# Below this many weights a packed oneDNN call's fixed cost (~20-30 us) outweighs what it saves.
MIN_PACKED_NUMEL = 1 << 18
# Weights past the caches (>= PACKED_LARGE_NUMEL, e.g. an LM head) use the packed copy from 2
# rows; smaller ones from the row count measured by packed_gemm_min_rows.
PACKED_LARGE_NUMEL = 1 << 22


def _tensor_key(tensor: torch.Tensor | None) -> tuple[int, int]:
    return (-1, -1) if tensor is None else (tensor.data_ptr(), tensor._version)


class FusedLinear:
    """``x [..., K] -> [..., sum N_i]``: the concatenated outputs of ``linears``."""

    def __init__(self, linears: list[nn.Linear], pack: bool = True):
        self.linears = list(linears)
        self.out_features = [linear.out_features for linear in self.linears]
        self.allow_packing = pack
        self.weight: torch.Tensor | None = None  # W^T [K, N] (None when every call uses the packed copy)
        self.packed_weight: torch.Tensor | None = None  # oneDNN-packed [N, K] (CPU bfloat16, large float32)
        self.bias: torch.Tensor | None = None  # [N] or None
        self.packed_min_rows = 1
        self._key: tuple = ()
        self.num_refreshes = 0

    def _current_key(self) -> tuple:
        return tuple(_tensor_key(t) for linear in self.linears for t in (linear.weight, linear.bias))

    def refresh(self) -> bool:
        """Rebuild the fused copy if a source weight/bias changed; True when it did."""
        key = self._current_key()
        if key == self._key:
            return False
        with torch.no_grad():
            weights = [linear.weight.detach() for linear in self.linears]
            weight = weights[0] if len(weights) == 1 else torch.cat(weights)
            is_bfloat16 = weight.dtype == torch.bfloat16
            is_packable = (
                self.allow_packing
                and weight.device.type == "cpu"
                and (is_bfloat16 or (weight.dtype == torch.float32 and weight.numel() >= MIN_PACKED_NUMEL))
                and is_packing_available()
            )
            self.packed_weight = (
                torch.ops.mkldnn._reorder_linear_weight(weight, batch_size=32) if is_packable else None
            )
            if is_packable and is_bfloat16:  # oneDNN's bfloat16 GEMM wins at every row count
                self.weight, self.packed_min_rows = None, 1
            else:
                self.weight = weight.t().contiguous()  # [K, N]
                self.packed_min_rows = self._float32_packed_min_rows(weight) if is_packable else 1
            self.bias = None
            if any(linear.bias is not None for linear in self.linears):
                self.bias = torch.cat(
                    [
                        linear.bias.detach()
                        if linear.bias is not None
                        else weight.new_zeros(linear.out_features)
                        for linear in self.linears
                    ]
                )
        self._key = key
        self.num_refreshes += 1
        return True

    @staticmethod
    def _float32_packed_min_rows(weight: torch.Tensor) -> int:
        if weight.numel() >= PACKED_LARGE_NUMEL:
            return 2
        out_features, in_features = weight.shape
        return packed_gemm_min_rows(in_features, out_features, torch.get_num_threads())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.packed_weight is not None and flat.shape[0] >= self.packed_min_rows:
            out = torch.ops.mkldnn._linear_pointwise(flat, self.packed_weight, self.bias, "none", [], "")
        elif self.bias is None:
            out = torch.mm(flat, self.weight)
        else:
            out = torch.addmm(self.bias, flat, self.weight)
        return out.view(*x.shape[:-1], out.shape[-1])
