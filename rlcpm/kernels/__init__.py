"""Triton kernels, each beside its pure-PyTorch reference and one dispatch function.

Subpackages: rlcpm.kernels.ternary (BitCPM 2-bit ternary matmul). CPU runs use the
references; tests run the kernels under TRITON_INTERPRET=1; GPUs use the kernels.
"""
