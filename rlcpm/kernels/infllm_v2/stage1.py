"""Stage 1 of InfLLM v2 (SPECS §2.2-2.3): score 64-token blocks for every query token.

For query token t at position i (in sequence s) and KV head h with query heads g of its group:

    fine kernel j visible   iff  s1*j + k1 - 1 <= i        (wholly in the past)
    coarse kernel j visible iff  s2*j + k2 - 1 <= i
    lse_g  = logsumexp_j visible  q_g . Kc2_j / sqrt(d)    (LSE approximation)
           = logsumexp_j visible  q_g . Kc1_j / sqrt(d)    (exact variant: a true softmax)
    p[t, h, j] = sum_g exp(q_g . Kc1_j / sqrt(d) - lse_g)  for visible j, else 0

(a query that sees no lse kernel gets p = 0: flash-attention's empty-row convention, lse = +inf).
Block scores max-pool p over the kernels overlapping block b, j in [r*b - 1, r*b + r - 1]
(window r + 1, stride r = block_size / s1, padding 1; missing kernels count as 0), then with
qb = i // block_size:

    score[t, h, b] = +inf  for b < init_blocks or qb - local_blocks <= b <= qb   (forced)
                   = -inf  for b > qb                                            (future)

Scores are float32 [Tq, Hkv, num_blocks]; rlcpm.kernels.infllm_v2.select turns them into
top-k block indices. No gradient flows through stage 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlcpm.kernels.infllm_v2.config import InfLLMv2Config
from rlcpm.kernels.infllm_v2.layout import sequence_starts

_CHUNK_ELEMENTS = 1 << 25  # bound on the [S, Hq, chunk, N] score tensor of the reference


def _pad_rows(
    x: torch.Tensor, seq: torch.Tensor, index: torch.Tensor, num_seqs: int, width: int
) -> torch.Tensor:
    """Scatter rows x [n, ...] to a zero-padded [num_seqs, width, ...] at (seq, index)."""
    if num_seqs == 1 and x.shape[0] == width:  # one sequence, rows in order: nothing to pad
        return x[None]
    out = x.new_zeros(num_seqs, width, *x.shape[1:])
    out[seq, index] = x
    return out


def _padded_keys(kc: torch.Tensor, cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed compressed keys [N, Hkv, D] -> ([S, Hkv, Nmax, D] float32, counts [S])."""
    counts = (cu[1:] - cu[:-1]).long()
    num_seqs = counts.numel()
    if num_seqs == 1:  # nothing to pad
        return kc.float()[None].transpose(1, 2), counts
    seq = torch.repeat_interleave(torch.arange(num_seqs, device=kc.device), counts)
    index = torch.arange(seq.numel(), device=kc.device) - cu[:-1].long()[seq]
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    return _pad_rows(kc.float(), seq, index, num_seqs, width).transpose(1, 2), counts


def _visible(q_pos: torch.Tensor, counts: torch.Tensor, width: int, kernel: int, stride: int) -> torch.Tensor:
    """[S, chunk, width] bool: kernel j exists for the sequence and ends at or before the query."""
    j = torch.arange(width, device=q_pos.device)
    ends = j * stride + kernel - 1
    return (ends <= q_pos[:, :, None]) & (j < counts[:, None, None])


def kernel_scores_reference(
    q: torch.Tensor,
    q_seq: torch.Tensor,
    q_pos: torch.Tensor,
    kc1: torch.Tensor,
    cu_c1: torch.Tensor,
    kc2: torch.Tensor,
    cu_c2: torch.Tensor,
    config: InfLLMv2Config,
    scale: float,
) -> torch.Tensor:
    """p [Tq, Hkv, N1max] (see the module docstring): group-summed stage-1 probabilities of the
    fine kernels of each query's sequence (index j = the sequence's j-th kernel; 0 past its end)."""
    num_seqs = cu_c1.numel() - 1
    kc1_pad, counts1 = _padded_keys(kc1, cu_c1)  # [S, Hkv, N1, D]
    if config.lse_approx:
        lse_pad, lse_counts = _padded_keys(kc2, cu_c2)
        lse_kernel, lse_stride = config.coarse_kernel_size, config.coarse_kernel_stride
    else:
        lse_pad, lse_counts = kc1_pad, counts1
        lse_kernel, lse_stride = config.kernel_size, config.kernel_stride
    lse_keys = (lse_pad, lse_counts, lse_kernel, lse_stride)
    num_q, num_heads, head_dim = q.shape
    counts_q, index = sequence_starts(q_seq, num_seqs)
    max_q = int(counts_q.max()) if q_seq.numel() else 0
    if num_q == num_seqs and max_q == 1:  # one query per sequence, in order (decode): no padding
        q_pad = q.float().reshape(num_seqs, 1, num_heads, head_dim)
        return _group_probs(q_pad, q_pos[:, None], kc1_pad, counts1, lse_keys, config, scale)[:, 0]
    n1 = kc1_pad.shape[2]
    out = torch.zeros(num_q, kc1.shape[1], n1, dtype=torch.float32, device=q.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, num_seqs * num_heads * max(n1, lse_pad.shape[2])))
    for start in range(0, max_q, chunk):
        rows = ((index >= start) & (index < start + chunk)).nonzero().squeeze(1)
        seq, local = q_seq[rows], index[rows] - start
        width = min(chunk, max_q - start)
        q_pad = _pad_rows(q[rows].float(), seq, local, num_seqs, width)  # [S, c, Hq, D]
        pos = _pad_rows(q_pos[rows], seq, local, num_seqs, width)  # padded rows are dropped below
        probs = _group_probs(q_pad, pos, kc1_pad, counts1, lse_keys, config, scale)  # [S, c, Hkv, N1]
        out[rows] = probs[seq, local]
    return out


def _group_probs(
    q_pad, pos, kc1_pad, counts1, lse_keys, config: InfLLMv2Config, scale: float
) -> torch.Tensor:
    """Queries q_pad [S, c, Hq, D] at positions pos [S, c] -> p [S, c, Hkv, N1] (module docstring)."""
    lse_pad, lse_counts, lse_kernel, lse_stride = lse_keys
    num_seqs, width, num_heads, head_dim = q_pad.shape
    num_kv = kc1_pad.shape[1]
    group = num_heads // num_kv
    q5 = q_pad.view(num_seqs, width, num_kv, group, head_dim).permute(0, 2, 3, 1, 4)  # [S, Hkv, G, c, D]
    # Stage 1 runs without gradient: the ops below work in place on the fresh score tensors.
    lse_scores = torch.einsum("shgcd,shnd->shgcn", q5, lse_pad).mul_(scale)
    lse_visible = _visible(pos, lse_counts, lse_pad.shape[2], lse_kernel, lse_stride)[:, None, None]
    if not bool(lse_visible.all()):  # a decode query sees every complete kernel: nothing to hide
        lse_scores.masked_fill_(~lse_visible, float("-inf"))
    lse = torch.logsumexp(lse_scores, dim=-1)
    lse.masked_fill_(torch.isneginf(lse), float("inf"))  # sees no lse kernel: p = 0
    probs = torch.einsum("shgcd,shnd->shgcn", q5, kc1_pad).mul_(scale).sub_(lse[..., None]).exp_()
    visible = _visible(pos, counts1, kc1_pad.shape[2], config.kernel_size, config.kernel_stride)[
        :, None, None
    ]
    if not bool(visible.all()):
        probs.masked_fill_(~visible, 0.0)
    probs = probs.nan_to_num_(nan=0.0).sum(dim=2)  # [S, Hkv, c, N1]
    return probs.permute(0, 2, 1, 3)


def pool_block_scores(
    kernel_scores: torch.Tensor, q_pos: torch.Tensor, num_blocks: int, config: InfLLMv2Config
) -> torch.Tensor:
    """Max-pool kernel scores [Tq, Hkv, N] into blocks and force init/local/future: [Tq, Hkv, num_blocks]."""
    r = config.pool_ratio
    needed = r * num_blocks + 1  # kernels -1 .. r*num_blocks - 1
    padded = F.pad(kernel_scores, (1, max(0, needed - 1 - kernel_scores.shape[-1])))[..., :needed]
    pooled = padded.unfold(-1, r + 1, r).amax(dim=-1)  # [Tq, Hkv, num_blocks]
    b = torch.arange(num_blocks, device=q_pos.device)
    qb = (q_pos // config.block_size)[:, None]
    forced = (b < config.init_blocks) | ((b >= qb - config.local_blocks) & (b <= qb))
    pooled = pooled.masked_fill(forced[:, None], float("inf"))
    return pooled.masked_fill((b > qb)[:, None], float("-inf"))


def block_scores_reference(
    q: torch.Tensor,
    q_seq: torch.Tensor,
    q_pos: torch.Tensor,
    kc1: torch.Tensor,
    cu_c1: torch.Tensor,
    kc2: torch.Tensor,
    cu_c2: torch.Tensor,
    num_blocks: int,
    config: InfLLMv2Config,
    scale: float,
) -> torch.Tensor:
    """Block scores [Tq, Hkv, num_blocks] float32 for queries q [Tq, Hq, D] (module docstring).

    q_seq/q_pos [Tq] int64: each query's sequence and position; kc1/kc2 [N, Hkv, D] packed
    per sequence by cu_c1/cu_c2 [S+1]; scale = 1/sqrt(D).
    """
    probs = kernel_scores_reference(q, q_seq, q_pos, kc1, cu_c1, kc2, cu_c2, config, scale)
    return pool_block_scores(probs, q_pos, num_blocks, config)
