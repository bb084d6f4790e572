"""The one place that decides whether a kernel op runs its Triton kernel or its PyTorch reference.

Every op in rlcpm.kernels is a `KernelOp`: a PyTorch reference and a Triton kernel with the same
signature. `KernelOp.__call__` picks one from the device of its first tensor argument:

    RLCPM_KERNELS=reference   always the reference
    RLCPM_KERNELS=triton      always the kernel (on CPU tensors this needs TRITON_INTERPRET=1
                              set before the kernel module is imported: Triton's interpreter)
    RLCPM_KERNELS=auto        (default) the kernel on CUDA tensors when Triton imports, else the
                              reference (CPU, or a machine without Triton)

Kernel modules are imported on first use, so importing rlcpm never imports Triton. Tests call
`op.reference(...)` and `op.kernel(...)` directly to compare the two.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from functools import cache
from typing import Any

import torch

from rlcpm.errors import RlcpmError

_MODES = ("auto", "reference", "triton")


@cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_mode() -> str:
    mode = os.environ.get("RLCPM_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise RlcpmError(f"RLCPM_KERNELS={mode!r} is not one of {', '.join(_MODES)}")
    return mode


def use_triton(device: torch.device) -> bool:
    """True when an op on tensors of `device` should run its Triton kernel (see module docstring)."""
    mode = kernel_mode()
    if mode == "reference":
        return False
    if mode == "triton":
        if not triton_available():
            raise RlcpmError("RLCPM_KERNELS=triton but Triton is not installed (pip install triton)")
        return True
    return device.type == "cuda" and triton_available()


class KernelOp:
    """A named op with a PyTorch `reference` and a Triton `kernel` ("module:function", imported lazily)."""

    def __init__(self, name: str, reference: Callable[..., Any], kernel: str):
        self.name = name
        self.reference = reference
        self._kernel_path = kernel
        self.__doc__ = reference.__doc__

    @property
    def kernel(self) -> Callable[..., Any]:
        module, _, function = self._kernel_path.partition(":")
        return getattr(importlib.import_module(module), function)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        device = first.device if first is not None else torch.device("cpu")
        return (self.kernel if use_triton(device) else self.reference)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"KernelOp({self.name!r}, kernel={self._kernel_path!r})"
