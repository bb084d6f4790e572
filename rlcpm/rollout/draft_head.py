"""FR-Spec draft LM head: the draft model's output layer restricted to a frequent-token subset.

    head = DraftHead(draft_model.lm_head.weight, subset_ids)     # subset_ids: [Vs] full ids
    logits_sub = head(hidden)                                     # [N, H] -> [N, Vs]
    full_ids = head.to_full_ids(sub_index)                        # [...] -> [...]

With ``V_sub`` the subset (SPECS §3.2, FR-Spec arXiv 2502.14856):

    W_sub = W_lm[V_sub]                 row gather, [Vs, H] (a copy: the draft is never trained)
    logits_sub = h . W_sub^T            [N, Vs], exactly the full logits at the subset's ids
    q = softmax over the subset only    every other token gets probability 0

The embeddings stay full (any token the target emits can be fed to the draft); only the
LM-head GEMM shrinks, from 2·H·V to 2·H·Vs FLOPs per drafted token. ``subset_ids=None`` keeps
the whole vocabulary (the plain draft head, for comparisons).
"""

from __future__ import annotations

import torch
from torch import nn

from rlcpm.errors import EngineError


class DraftHead(nn.Module):
    """LM head over a subset of the vocabulary (sorted ids), with maps between subset and full ids.

    Args:
        lm_head_weight: the draft model's LM-head weight [V, H].
        subset_ids: full-vocabulary ids to keep, any order, no duplicates; None: all V ids.
    """

    def __init__(self, lm_head_weight: torch.Tensor, subset_ids: torch.Tensor | list[int] | None = None):
        super().__init__()
        vocab_size, hidden_size = lm_head_weight.shape
        device = lm_head_weight.device
        if subset_ids is None:
            ids = torch.arange(vocab_size, device=device)
        else:
            ids = torch.as_tensor(subset_ids, dtype=torch.long, device=device).flatten().sort().values
            if ids.numel() == 0:
                raise EngineError("the draft head's token subset is empty: keep at least the EOS ids")
            if int(ids[0]) < 0 or int(ids[-1]) >= vocab_size:
                raise EngineError(
                    f"draft head subset holds ids outside the draft vocabulary [0, {vocab_size}): "
                    f"min {int(ids[0])}, max {int(ids[-1])}"
                )
            if bool((ids[1:] == ids[:-1]).any()):
                raise EngineError("draft head subset holds duplicate token ids")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.proj = nn.Linear(hidden_size, ids.numel(), bias=False, device=device, dtype=lm_head_weight.dtype)
        with torch.no_grad():
            self.proj.weight.copy_(lm_head_weight.detach()[ids])  # W_sub = W_lm[V_sub]
        self.proj.requires_grad_(False)
        self.register_buffer("subset_ids", ids, persistent=False)  # [Vs] sorted full ids
        index = torch.full((vocab_size,), -1, dtype=torch.long, device=device)
        index[ids] = torch.arange(ids.numel(), device=device)
        self.register_buffer("subset_index", index, persistent=False)  # [V] full id -> subset row or -1

    @property
    def num_tokens(self) -> int:
        """Vs, the size of the subset."""
        return self.subset_ids.numel()

    @property
    def is_full_vocabulary(self) -> bool:
        return self.num_tokens == self.vocab_size

    @property
    def flops_per_token(self) -> int:
        """Multiply-adds x 2 of the head for one drafted token: 2 · H · Vs."""
        return 2 * self.hidden_size * self.num_tokens

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Subset logits: hidden [..., H] -> [..., Vs] (= full logits gathered at ``subset_ids``)."""
        return self.proj(hidden)

    def to_full_ids(self, sub_index: torch.Tensor) -> torch.Tensor:
        """Subset rows [...] -> full-vocabulary ids [...]."""
        return self.subset_ids[sub_index]

    def to_subset_index(self, full_ids: torch.Tensor) -> torch.Tensor:
        """Full ids [...] -> subset rows [...], -1 for ids outside the subset."""
        return self.subset_index[full_ids]
