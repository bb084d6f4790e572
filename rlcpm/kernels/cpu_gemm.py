"""Float32 CPU GEMMs through oneDNN, with autograd: the learner's linear layers.

PyTorch's float32 ``F.linear`` / ``mm`` on CPU calls MKL's sgemm. On AMD CPUs MKL takes a
generic code path. On the development VM's EPYC (Zen 4, AVX-512), one process measured the learner's
shapes (6000 tokens x 512 <-> 1365) side by side:
- MKL: 70-100 GFLOP/s per core;
- oneDNN (``torch.ops.mkldnn._linear_pointwise`` on plain tensors, no weight prepacking):
  190-220 GFLOP/s per core;
- with two threads, a linear's forward, input-gradient and weight-gradient GEMMs together took
  about half the time through oneDNN, and a GRPO learner step of a 23.6M-parameter llama over
  ~5.6k tokens went from ~6.0 s to ~3.9 s (same loss and gradient norm to 6 digits).
The learner switches its linears here on CPU (``learner.cpu_gemm: onednn``, the default; the
engine already multiplies on oneDNN-prepacked weights, rlcpm.rollout.packed_linear).
A training step runs three GEMMs per linear, all three here through oneDNN:

    y  = x W^T + b        linear(x, W)
    dx = dy W             linear(dy, W^T)        (W^T: a transposed view, no copy)
    dW = dy^T x           linear(dy^T, x^T)
    db = sum_rows dy

``matmul_nt(a, b) = a @ b^T`` is the same GEMM without autograd, for code that writes its own
backward: the learner's chunked log-prob head, whose logits and hidden-state gradient it
computes when the LM head is a OneDNNLinear (512 tokens x 1024 x 152k vocabulary, two threads:
forward 1.33 -> 0.70 s, forward and backward 4.5 -> 2.7 s).
``linear`` and ``matmul_nt`` use oneDNN only for float32 CPU tensors outside autocast (not for DTensors or empty
inputs), and fall back to PyTorch's own op otherwise. The two libraries compute the same dot
products; only the summation order differs, so results agree to float32 rounding (relative
differences ~1e-6 at K = 1365).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _is_plain_cpu_float32(*tensors: torch.Tensor) -> bool:
    return all(
        type(t) in (torch.Tensor, nn.Parameter)  # not a DTensor or another subclass
        and t.device.type == "cpu"
        and t.dtype == torch.float32
        and t.numel() > 0
        for t in tensors
    )


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when ``linear(x, weight)`` / ``matmul_nt(x, weight)`` run on oneDNN."""
    return _is_plain_cpu_float32(x, weight) and not torch.is_autocast_enabled("cpu") and onednn_available()


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def matmul_nt(a: torch.Tensor, b: torch.Tensor, onednn: bool = True) -> torch.Tensor:
    """a [M, K] @ b [N, K]^T -> [M, N], not differentiable through oneDNN: on oneDNN when
    `onednn` and ``uses_onednn(a, b)``, else ``a @ b.t()``."""
    if onednn and uses_onednn(a, b):
        return _onednn_linear(a, b)
    return a @ b.t()


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        out = _onednn_linear(x2, weight, None if bias is None else bias.detach())
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight = ctx.saved_tensors
        grad2 = grad_out.reshape(-1, weight.shape[0])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(grad2, weight.t()).view(*grad_out.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            grad_weight = _onednn_linear(grad2.t(), x2.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad2.sum(0)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, differentiable, through oneDNN where ``uses_onednn``."""
    if not uses_onednn(x, weight) or (bias is not None and not _is_plain_cpu_float32(bias)):
        return F.linear(x, weight, bias)
    return _OneDNNLinear.apply(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` whose float32 CPU forward and backward run on oneDNN (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_onednn_linears(model: nn.Module) -> int:
    """Switch every plain ``nn.Linear`` of ``model`` to ``OneDNNLinear`` in place (same parameters,
    names and state dict); subclasses (QAT's BitLinear, ...) are left alone. Returns how many."""
    if not onednn_available():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
            count += 1
    return count
