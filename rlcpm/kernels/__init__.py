"""Triton kernels, each beside its pure-PyTorch reference and one dispatch function.

Subpackages: rlcpm.kernels.infllm_v2 (InfLLM v2 sparse attention) and rlcpm.kernels.ternary
(BitCPM 2-bit ternary matmul). rlcpm.kernels.dispatch picks kernel or reference for every op:
CPU runs use the references; tests run the kernels under TRITON_INTERPRET=1; GPUs use the kernels.
"""
