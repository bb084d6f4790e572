"""Block selection (SPECS §2.4): top-k of the stage-1 block scores per query token and KV head.

    k_eff = min(topk + local_blocks, num_blocks)        (96 by default)

The k_eff best blocks are kept, sorted ascending; blocks after the query's own block (score
-inf) are dropped and the row is padded with -1 at the end. Ties are broken towards the lower
block index, on every device (a total order on (score, -index)), so the learner's packed
forward and the engine's decode pick the same blocks from the same scores.
"""

from __future__ import annotations

import torch

from rlcpm.kernels.infllm_v2.config import InfLLMv2Config

_CHUNK_SCORES = 1 << 26  # bound on Tq_chunk * Hkv * num_blocks scored at once


def _ranking_key(scores: torch.Tensor) -> torch.Tensor:
    """int64 key, strictly decreasing in (score, -index): float order mapped onto int32 bits."""
    bits = scores.float().contiguous().view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # monotone in the float value
    index = torch.arange(scores.shape[-1], device=scores.device)
    return (ordered << 32) - index


def topk_blocks(block_scores: torch.Tensor, config: InfLLMv2Config) -> torch.Tensor:
    """block_scores [Tq, Hkv, nb] -> block indices [Tq, Hkv, k_eff] int32, ascending, -1 padded."""
    num_blocks = block_scores.shape[-1]
    k_eff = min(config.num_selected, num_blocks)
    top = _ranking_key(block_scores).topk(k_eff, dim=-1, sorted=False).indices
    valid = torch.gather(block_scores, -1, top) > float("-inf")
    top = torch.where(valid, top, num_blocks).sort(dim=-1).values
    return torch.where(top == num_blocks, -1, top).to(torch.int32)


def select_blocks(
    q: torch.Tensor,
    q_seq: torch.Tensor,
    q_pos: torch.Tensor,
    kc1: torch.Tensor,
    cu_c1: torch.Tensor,
    kc2: torch.Tensor,
    cu_c2: torch.Tensor,
    config: InfLLMv2Config,
    scale: float,
    block_scores=None,
) -> torch.Tensor:
    """Stage 1 + top-k for queries q [Tq, Hq, D]: block indices [Tq, Hkv, k_eff] int32.

    Runs without gradient and without autocast (scores are float32 under the learner's bf16
    autocast too), in query chunks that bound the score tensor. `block_scores` is the scoring
    op (default: the dispatched `block_scores`, Triton on GPU).
    """
    if block_scores is None:
        from rlcpm.kernels.infllm_v2 import block_scores
    num_kv = kc1.shape[1]
    num_blocks = int(q_pos.max()) // config.block_size + 1 if q_pos.numel() else 1
    chunk = max(1, _CHUNK_SCORES // (num_kv * num_blocks))
    pieces = []
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        for start in range(0, q.shape[0], chunk):
            part = slice(start, start + chunk)
            scores = block_scores(
                q[part].detach(), q_seq[part], q_pos[part], kc1, cu_c1, kc2, cu_c2, num_blocks, config, scale
            )
            pieces.append(topk_blocks(scores, config))
    if not pieces:
        return torch.empty(
            0, num_kv, min(config.num_selected, num_blocks), dtype=torch.int32, device=q.device
        )
    return torch.cat(pieces)
