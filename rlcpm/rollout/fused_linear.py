"""One linear map over the weights of several ``nn.Linear`` layers: an engine-side copy.

``FusedLinear([q_proj, k_proj, v_proj])(x)`` computes ``cat([q_proj(x), k_proj(x), v_proj(x)], -1)``
with ONE matrix multiply over a weight built by concatenating the layers' weights along the
output dimension, ``W = [Wq; Wk; Wv]`` ([sum N_i, K]), and their biases (zeros where a layer has
none). On CPU in float32 a large enough ``W`` is prepacked for oneDNN
(``torch.ops.mkldnn._linear_pointwise``, see rlcpm.rollout.packed_linear); a smaller one is
kept transposed, ``W^T`` [K, N] contiguous, for ``addmm(b, x, W^T)`` (measured 10-25% faster
than ``F.linear``'s transposed-operand GEMM on decode shapes with cold caches). Each output column is the same dot product the separate layer computes (the sum
order inside a GEMM may differ, so results agree to rounding).

The copy follows the source layers: ``refresh()`` rebuilds it when any source weight or bias
changed in place (its version counter moved: ``update_weights``, an optimizer step) or was
replaced, so a stale copy is never used as long as ``refresh()`` runs before each forward
(the fused decoder does it once per step). The source modules are never modified.
"""

from __future__ import annotations

import torch
from torch import nn

from rlcpm.rollout.packed_linear import is_packing_available

# Below this many weights a packed oneDNN call's fixed cost (~20-30 us) outweighs what it saves.
MIN_PACKED_NUMEL = 1 << 18


def _tensor_key(tensor: torch.Tensor | None) -> tuple[int, int]:
    return (-1, -1) if tensor is None else (tensor.data_ptr(), tensor._version)


class FusedLinear:
    """``x [..., K] -> [..., sum N_i]``: the concatenated outputs of ``linears``."""

    def __init__(self, linears: list[nn.Linear], pack: bool = True):
        self.linears = list(linears)
        self.out_features = [linear.out_features for linear in self.linears]
        self.allow_packing = pack
        self.weight: torch.Tensor | None = None  # oneDNN-packed [N, K], or plain W^T [K, N]
        self.bias: torch.Tensor | None = None  # [N] or None
        self.is_packed = False
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
            self.is_packed = (
                self.allow_packing
                and weight.device.type == "cpu"
                and weight.dtype == torch.float32
                and weight.numel() >= MIN_PACKED_NUMEL
                and is_packing_available()
            )
            if self.is_packed:
                self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch_size=32)
            else:
                self.weight = weight.t().contiguous()  # [K, N]
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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.is_packed:
            out = torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, "none", [], "")
        elif self.bias is None:
            out = torch.mm(flat, self.weight)
        else:
            out = torch.addmm(self.bias, flat, self.weight)
        return out.view(*x.shape[:-1], out.shape[-1])
