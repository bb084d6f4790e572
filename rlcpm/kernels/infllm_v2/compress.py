"""Key compression (SPECS §2.1): mean pooling of keys over sliding windows.

    Kc1[j] = mean(K[s1*j : s1*j + k1])     k1 = kernel_size (32), s1 = kernel_stride (16)
    Kc2[j] = mean(K[s2*j : s2*j + k2])     k2 = 4*k1 (128), s2 = 4*s1 (64)  (LSE approximation)

Only full windows count: a sequence of L keys has max(0, (L - k) // s + 1) of them, and
window j is complete once key s*j + k - 1 exists. No gradient flows through selection, so
compression runs on detached keys.

One primitive, `mean_pool_windows(keys, window_rows)`, averages rows of a flat key tensor; batch
compression (packed training keys) and the engine's incremental compression (windows read
from the paged KV cache, rlcpm.kernels.infllm_v2.paged_compression) both call it, so a
compressed key has the same value whichever path computed it.
"""

from __future__ import annotations

import torch


def num_windows(lengths: torch.Tensor, kernel_size: int, kernel_stride: int) -> torch.Tensor:
    """Complete windows in sequences of `lengths` keys: max(0, (L - k) // s + 1)."""
    return torch.clamp((lengths - kernel_size) // kernel_stride + 1, min=0)


def mean_pool_windows_reference(keys: torch.Tensor, window_rows: torch.Tensor) -> torch.Tensor:
    """keys [R, H, D], window_rows [N, k] int64 -> [N, H, D]: mean over each window's rows,
    accumulated in float32, returned in keys.dtype."""
    if window_rows.numel() == 0:
        return keys.new_zeros(0, *keys.shape[1:])
    windows = keys.index_select(0, window_rows.reshape(-1)).view(
        *window_rows.shape, *keys.shape[1:]
    )  # [N, k, H, D]
    return windows.sum(dim=1, dtype=torch.float32).div_(window_rows.shape[1]).to(keys.dtype)


def window_rows_packed(
    cu_seqlens: torch.Tensor, kernel_size: int, kernel_stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of every complete window of packed sequences: (window_rows [N, k], cu_windows [S+1])."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    counts = num_windows(lengths, kernel_size, kernel_stride)
    cu_windows = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=cu_seqlens.device)
    cu_windows[1:] = torch.cumsum(counts, 0)
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), counts)
    j = torch.arange(seq.numel(), device=cu_seqlens.device) - (cu_windows[:-1].long())[seq]
    starts = cu_seqlens.long()[seq] + j * kernel_stride
    rows = starts[:, None] + torch.arange(kernel_size, device=cu_seqlens.device)
    return rows, cu_windows


def compress_keys(
    k: torch.Tensor, cu_seqlens: torch.Tensor, kernel_size: int, kernel_stride: int, pool=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch compression of packed keys k [T, Hkv, D] -> (kc [N, Hkv, D], cu_windows [S+1] int32).

    `pool` is the mean-pooling op (default: the dispatched `mean_pool_windows`).
    """
    if pool is None:
        from rlcpm.kernels.infllm_v2 import mean_pool_windows as pool
    rows, cu_windows = window_rows_packed(cu_seqlens, kernel_size, kernel_stride)
    return pool(k.detach(), rows), cu_windows
