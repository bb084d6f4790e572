"""Reusable scratch buffers for the CPU reference kernels.

A large CPU tensor is a fresh mmap: every page is faulted in and zeroed by the kernel on first
touch, at every allocation. For InfLLM v2 decode, gathering the ~12 MB of selected keys and
values of one layer into new tensors takes about as long again as the gather itself. A
`Workspace` keeps its buffers and hands out views of them, grown on demand.

A view stays valid until the next request under the same name on the same thread: use it for
temporaries that never leave the call (never for a result or anything autograd saves).
"""

from __future__ import annotations

import math
import threading

import torch


class Workspace:
    """Named scratch buffers, one set per thread, dtype, device and inference mode."""

    def __init__(self):
        self._local = threading.local()

    def get(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """A contiguous tensor of `shape` (uninitialised) backed by the buffer `name`."""
        buffers = self._buffers()
        key = (name, dtype, torch.device(device), torch.is_inference_mode_enabled())
        numel = math.prod(shape)
        buffer = buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=device)
            buffers[key] = buffer
        return buffer[:numel].view(shape)

    def clear(self) -> None:
        """Free this thread's buffers."""
        self._buffers().clear()

    def nbytes(self) -> int:
        """Bytes held by this thread's buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers().values())

    def _buffers(self) -> dict:
        if not hasattr(self._local, "buffers"):
            self._local.buffers = {}
        return self._local.buffers


def can_use_scratch(*tensors: torch.Tensor) -> bool:
    """True for CPU tensors that autograd will not track (scratch views must not be saved)."""
    if any(t.device.type != "cpu" for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


scratch = Workspace()  # the process's scratch buffers for rlcpm.kernels
